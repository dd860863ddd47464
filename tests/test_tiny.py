"""The test helpers themselves: the tiny tokenizer and the v4 config rewrite."""

from __future__ import annotations

import json

import numpy as np
import transformers

import tiny


def test_tokenizer(tmp_path):
    tok = tiny.make_tokenizer(tmp_path)
    assert len(tok) <= 300  # fits the 320-token tiny models
    assert (tmp_path / "tokenizer.json").is_file()
    bos, eos = tok.convert_tokens_to_ids([tiny.BOS, tiny.EOS])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, eos)

    text = "The quick brown fox jumps over the lazy dog, twice!"
    ids = tok(text)["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    assert len(ids) < len(text)  # merges learned
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("naïve café ✓")["input_ids"], skip_special_tokens=True) == "naïve café ✓"  # byte-level

    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert (again.bos_token, again.eos_token, again.pad_token) == (tiny.BOS, tiny.EOS, tiny.EOS)
    padded = again(["hi", text], padding=True)
    assert padded["attention_mask"][0][0] == 0  # left padding


def test_v4_rewrite(tmp_path):
    tiny.make_checkpoint(tmp_path, spelling="v4", rope={"rope_type": "linear", "factor": 2.0})
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in config and "dtype" not in config
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    # transformers itself still reads it.
    assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_type"] == "linear"


def test_rel_err():
    assert tiny.rel_err(np.array([1.0, 2.0]), np.array([1.0, 4.0])) == 0.5
