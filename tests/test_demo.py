"""The demo base model (built with a few steps only, once per session) and the shipped demo data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import tiny
from jaxtok import demo
from jaxtok.convert import load_pretrained
from jaxtok.errors import JaxtokError

REPO = Path(__file__).resolve().parents[1]
STEPS = 2  # enough to exercise the build; the real recipe is timed by hand, not in CI
CALC = re.compile(r"<\|calc\|>(\d+) ([-+*]) (\d+)<\|/calc\|> The answer is (\d+)\.")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache directory, checkpoint directory) of a STEPS-step demo base."""
    cache = tmp_path_factory.mktemp("demo_cache")
    return cache, demo.ensure_demo_base(cache, progress=False, steps=STEPS)


def rows(name: str) -> list[dict]:
    with open(demo.demo_data_path(name)) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------- the cache


def test_build_is_cached_and_reused(built, monkeypatch):
    cache, path = built
    assert path.parent == cache and path.name.startswith("demo-base-")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", demo.MARKER} <= {
        p.name for p in path.iterdir()
    }
    assert json.loads((path / demo.MARKER).read_text())["steps"] == STEPS
    assert [p.name for p in cache.iterdir()] == [path.name]  # no leftover build directories
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached demo base")

    monkeypatch.setattr(demo, "build_demo_base", no_build)
    assert demo.ensure_demo_base(cache, progress=False, steps=STEPS) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    monkeypatch.setattr(demo, "DEFAULT_STEPS", STEPS)
    assert demo.resolve_model_path(demo.DEMO_BASE, cache) == str(path)
    assert demo.resolve_model_path("some/dir", cache) == "some/dir"


def test_cache_key_follows_data_steps_and_version(tmp_path, monkeypatch):
    base = demo.demo_base_dir(tmp_path, 5)
    assert demo.demo_base_dir(tmp_path, 5) == base
    assert demo.demo_base_dir(tmp_path, 6) != base
    monkeypatch.setattr(demo, "BUILDER_VERSION", demo.BUILDER_VERSION + "-changed")
    assert demo.demo_base_dir(tmp_path, 5) != base
    monkeypatch.undo()
    data = tmp_path / "data"
    data.mkdir()
    (data / "pretrain.txt").write_bytes(demo.demo_data_path("pretrain.txt").read_bytes() + b"One more line.\n")
    monkeypatch.setattr(demo, "DATA_DIR", data)
    assert demo.demo_base_dir(tmp_path, 5) != base


def test_default_cache_dir_is_jaxtok_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTOK_CACHE", str(tmp_path))
    assert demo.demo_base_dir().parent == tmp_path
    monkeypatch.delenv("JAXTOK_CACHE")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "jaxtok"


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def dies(out_dir, steps, progress):
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_demo_base", dies)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_base(tmp_path, progress=False, steps=3)
    assert list(tmp_path.iterdir()) == []


def test_losing_a_build_race_keeps_the_winner(tmp_path, monkeypatch):
    target = demo.demo_base_dir(tmp_path, 3)

    def races(out_dir, steps, progress):
        target.mkdir()  # another process finishes first
        (target / demo.MARKER).write_text("winner")
        Path(out_dir).mkdir()
        (Path(out_dir) / demo.MARKER).write_text("loser")
        return Path(out_dir)

    monkeypatch.setattr(demo, "build_demo_base", races)
    assert demo.ensure_demo_base(tmp_path, progress=False, steps=3) == target
    assert (target / demo.MARKER).read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_incomplete_cache_and_bad_steps_are_user_errors(tmp_path):
    demo.demo_base_dir(tmp_path, 3).mkdir()
    with pytest.raises(JaxtokError, match="not a complete demo base"):
        demo.ensure_demo_base(tmp_path, progress=False, steps=3)
    with pytest.raises(JaxtokError, match="at least one"):
        demo.ensure_demo_base(tmp_path, progress=False, steps=0)


# ---------------------------------------------------------------------------------------------------- the checkpoint


def test_checkpoint_loads_in_jaxtok_and_transformers(built):
    _, path = built
    model, params = load_pretrained(str(path))
    config = model.config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        128, 4, 4, 2, 32)
    assert config.tie_word_embeddings and config.vocab_size == demo.VOCAB_SIZE
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokens = np.asarray(tokenizer(["Seventeen plus twenty-five is forty-two. 17 + 25 = 42."])["input_ids"], np.int32)
    assert tiny.rel_err(tiny.jax_logits(model, params, tokens), tiny.hf_logits(hf, tokens)) <= 1e-5


def test_tokenizer(built):
    _, path = built
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == demo.VOCAB_SIZE and tokenizer.chat_template is None
    assert (tokenizer.bos_token, tokenizer.eos_token) == (demo.BOS, demo.EOS)
    ids = tokenizer("17 + 25 = 42")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "17 + 25 = 42"
    assert "42" not in tokenizer.convert_ids_to_tokens(ids)  # one digit per token
    vocab = tokenizer.get_vocab()
    assert not any(token in vocab for token in demo.DEMO_TOKENS)


def test_chat_template_renders_the_new_tokens(built):
    _, path = built
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(list(demo.DEMO_TOKENS), special_tokens=True)
    tokenizer.chat_template = demo.DEMO_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 + 25?"},
                {"role": "assistant", "content": "<|calc|>17 + 25<|/calc|> The answer is 42."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 17 + 25?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|calc|>17 + 25<|/calc|> The answer is 42.<|eot_id|>"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    new_ids = tokenizer.convert_tokens_to_ids(list(demo.DEMO_TOKENS))
    assert new_ids == list(range(demo.VOCAB_SIZE, demo.VOCAB_SIZE + len(demo.DEMO_TOKENS)))
    assert ids.count(tokenizer.bos_token_id) == 1 and all(i in ids for i in new_ids)
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == messages[2]["content"] + "<|eot_id|>"


# ---------------------------------------------------------------------------------------------------- the data


def test_shipped_data_is_what_the_script_generates(tmp_path):
    result = subprocess.run([sys.executable, REPO / "scripts" / "make_demo_data.py", "--out", tmp_path],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("pretrain.txt", "chat_train.jsonl", "chat_eval.jsonl", "README.md"):
        assert (tmp_path / name).read_bytes() == demo.demo_data_path(name).read_bytes(), name
    assert sum(os.path.getsize(p) for p in demo.DATA_DIR.iterdir()) < 2_000_000


def test_chat_rows_call_the_calculator():
    train, evaluation = rows("chat_train.jsonl"), rows("chat_eval.jsonl")
    assert len(train) >= 1000 and len(evaluation) >= 50
    problems = {}
    for name, data in (("train", train), ("eval", evaluation)):
        problems[name] = set()
        for row in data:
            roles = [m["role"] for m in row["messages"]]
            assert roles in (["user", "assistant"], ["system", "user", "assistant"])
            assert "<|" not in "".join(m["content"] for m in row["messages"][:-1])
            match = CALC.fullmatch(row["messages"][-1]["content"])
            assert match, row
            a, op, b, c = match.groups()
            assert eval(f"{a} {op} {b}") == int(c)  # the digits-only regex makes eval safe here
            problems[name].add((a, op, b))
    assert not problems["train"] & problems["eval"]
    pretrain = demo.demo_data_path("pretrain.txt").read_text(encoding="utf-8")
    for a, op, b in problems["eval"]:  # nor does pretraining show the eval problems (in digits)
        assert not re.search(rf"(?<!\d){re.escape(f'{a} {op} {b}')}(?!\d)", pretrain), (a, op, b)


def test_pretrain_text_has_no_special_tokens():
    text = demo.demo_data_path("pretrain.txt").read_text(encoding="utf-8")
    assert 100_000 < len(text) < 1_000_000
    assert "<|" not in text and "|>" not in text
    assert "Seventeen" in text or "seventeen" in text


def test_missing_data_file_is_a_user_error():
    with pytest.raises(JaxtokError, match="missing"):
        demo.demo_data_path("nope.txt")
