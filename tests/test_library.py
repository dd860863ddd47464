"""README's "Using jaxtok as a library" example, run as written on a tiny checkpoint: it trains, and the adapter it
exports carries what trained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import chex
import jax
import pytest

import jaxtok
import tiny
from jaxtok.convert import load_pretrained
from jaxtok.peft_import import apply_adapter
from jaxtok.tokenizer import load_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Using jaxtok as a library\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_public_names_load_on_first_use():
    for name in jaxtok.__all__:
        assert getattr(jaxtok, name) is not None, name
    assert re.fullmatch(r"\d+\.\d+\.\d+", jaxtok.__version__)


@pytest.mark.slow  # trains 20 steps
def test_readme_example_trains_and_exports(copy_checkpoint, tmp_path, monkeypatch, capsys):
    base = copy_checkpoint(tied=True)
    tiny.make_tokenizer(base)
    base = str(base)
    code = readme_example()
    assert code.count('"path/to/llama"') == 1 and code.count('"train.jsonl"') == 1
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus {i} is <|calc|> {2 * i}, said the cat."}) + "\n"
                            for i in range(32)))
    code = code.replace('"path/to/llama"', repr(base)).replace('"train.jsonl"', repr(str(data)))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)

    losses = [float(x) for x in re.findall(r"loss (\S+)", capsys.readouterr().out)]
    assert len(losses) == 20 and losses[-1] < losses[0]
    # the adapter on disk is the trained state: its token row and LoRA, read back through PEFT's format
    model, params = load_pretrained(base, dtype="float32")
    model, _, adapters, tokenizer = apply_adapter(tmp_path / "adapter", model, params, load_tokenizer(base))
    assert model.token_rows.embed_ids == scope["added"]
    assert tokenizer.convert_ids_to_tokens(scope["added"][0]) == "<|calc|>"
    chex.assert_trees_all_close(adapters, jax.device_get(scope["state"].trainable), rtol=0, atol=0)
