"""The demo base model (built with a few steps only, once per session), the shipped demo data, and the calculator
loop and held-out score on that base."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

import tiny
from jaxtok import chat, demo
from jaxtok.convert import load_pretrained
from jaxtok.data import encode
from jaxtok.errors import JaxtokError
from jaxtok.generate import generate
from jaxtok.tokenizer import load_tokenizer
from jaxtok.vocab import add_tokens

REPO = Path(__file__).resolve().parents[1]
STEPS = 2  # enough to exercise the build; the real recipe is timed by hand, not in CI
CALL = re.compile(r"<\|calc\|>(\d+) ([-+*]) (\d+)<\|/calc\|>")
ANSWER = re.compile(r"The answer is (-?\d+)\.")
HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
DEMO = pytest.mark.slow  # builds the demo base and runs the demo on it, or regenerates its data


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache directory, checkpoint directory) of a STEPS-step demo base."""
    cache = tmp_path_factory.mktemp("demo_cache")
    return cache, demo.ensure_demo_base(cache, progress=False, steps=STEPS)


def rows(name: str) -> list[dict]:
    with open(demo.demo_data_path(name)) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------- the cache


@DEMO
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


@DEMO
def test_checkpoint_loads_in_jaxtok_and_transformers(built, tiny_torch):
    _, path = built
    model, params = load_pretrained(str(path))
    config = model.config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        128, 2, 4, 4, 32)
    assert config.tie_word_embeddings and config.vocab_size == demo.VOCAB_SIZE
    hf = tiny_torch.load_model(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokens = np.asarray(tokenizer(["Seventeen plus twenty-five is forty-two. 17 + 25 = 42."])["input_ids"], np.int32)
    assert tiny.rel_err(tiny.jax_logits(model, params, tokens), tiny_torch.hf_logits(hf, tokens)) <= 1e-5


@DEMO
def test_tokenizer(built):
    _, path = built
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == demo.VOCAB_SIZE and tokenizer.chat_template is None
    assert (tokenizer.bos_token, tokenizer.eos_token) == (demo.BOS, demo.EOS)
    ids = tokenizer("17 + 25 = 42")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "17 + 25 = 42"
    # numbers in pieces of up to three digits, as Llama 3 splits them; the demo's numbers are mostly one token each
    assert tokenizer.tokenize("17 + 25 = 42") == ["17", "Ġ+", "Ġ", "25", "Ġ=", "Ġ", "42"]
    assert tokenizer.tokenize("1234") == ["123", "4"]
    assert sum(len(tokenizer.tokenize(str(n))) == 1 for n in range(200)) >= 190
    vocab = tokenizer.get_vocab()
    assert not any(token in vocab for token in demo.DEMO_TOKENS)


@DEMO
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


@DEMO
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
            messages = row["messages"]
            roles = [m["role"] for m in messages]
            assert roles in (["user", "assistant", "tool", "assistant"], ["system", "user", "assistant", "tool",
                                                                          "assistant"])
            user, call, tool, final = [m["content"] for m in messages[-4:]]
            assert "<|" not in user and "<|" not in tool
            match = CALL.fullmatch(call)
            assert match, row
            a, op, b = match.groups()
            assert int(tool) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert final == f"The answer is {tool}."
            problems[name].add((a, op, b))
    assert not problems["train"] & problems["eval"]
    pretrain = demo.demo_data_path("pretrain.txt").read_text(encoding="utf-8")
    for a, op, b in problems["eval"]:  # nor does pretraining show the eval problems (in digits)
        assert not re.search(rf"(?<!\d){re.escape(f'{a} {op} {b}')}(?!\d)", pretrain), (a, op, b)
    # the held-out questions the demo asks (the first 10 eval rows) cover every operation and word problems
    first = [row["messages"] for row in evaluation[:10]]
    assert {CALL.fullmatch(m[-3]["content"]).group(2) for m in first} == {"+", "-", "*"}
    assert sum(" has " in m[-4]["content"] or " boxes " in m[-4]["content"] for m in first) >= 2


@DEMO
def test_tool_conversation_renders_and_masks_both_replies(built):
    """The template renders the tool turn like any other; the loss mask covers the two assistant replies only."""
    _, path = built
    tokenizer = load_tokenizer(str(path))
    tokenizer.add_tokens(list(demo.DEMO_TOKENS), special_tokens=True)
    row = rows("chat_train.jsonl")[0]
    messages = row["messages"][-4:]
    ids, mask = encode({"messages": messages}, tokenizer, "messages", demo.DEMO_CHAT_TEMPLATE)
    user, call, tool, final = [m["content"] for m in messages]
    assert tokenizer.decode(ids) == (
        f"<|begin_of_text|>{HEADER.format('user')}{user}<|eot_id|>{HEADER.format('assistant')}{call}<|eot_id|>"
        f"{HEADER.format('tool')}{tool}<|eot_id|>{HEADER.format('assistant')}{final}<|eot_id|>"
    )
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == f"{call}<|eot_id|>{final}<|eot_id|>"


def test_pretrain_text_has_no_special_tokens():
    text = demo.demo_data_path("pretrain.txt").read_text(encoding="utf-8")
    assert 100_000 < len(text) < 1_000_000
    assert "<|" not in text and "|>" not in text
    assert "Seventeen" in text or "seventeen" in text


# ---------------------------------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def demo_chat(built):
    """A `chat.Chat` on the STEPS-step base with the demo tokens added (their rows from the demo's descriptions)."""
    _, path = built
    model, params = load_pretrained(str(path))
    tokenizer = load_tokenizer(str(path))
    params, config, _ = add_tokens(tokenizer, params, model.config, demo.DEMO_TOKENS, demo.DEMO_TOKEN_DESCRIPTIONS)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    return chat.Chat(model.clone(config=config), {"params": params}, tokenizer, demo.DEMO_CHAT_TEMPLATE, 6, eot)


@DEMO
def test_tool_loop_on_the_demo_base(demo_chat, monkeypatch):
    """On a real model: each round is one batched generate call whose replies are what each prompt alone gives,
    cut at the end of turn; a call is run and its result goes back as a tool turn, exactly."""
    tokenizer, eot = demo_chat.tokenizer, demo_chat.stop_id
    rounds = []

    def spy(model, variables, prompts, max_new_tokens, **kwargs):
        outputs = generate(model, variables, prompts, max_new_tokens, **kwargs)
        rounds.append((prompts, [list(o) for o in outputs]))
        if len(rounds) == 1:  # an untrained base never calls: the first question's reply becomes a call
            outputs[0] = tokenizer("<|calc|>23 + 19<|/calc|><|eot_id|>", add_special_tokens=False)["input_ids"]
        return outputs

    monkeypatch.setattr(chat, "generate", spy)
    conversations = [[{"role": "user", "content": "What is 23 plus 19?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 5 and 7."}]]
    added = chat.converse(demo_chat, conversations)

    first_prompts, first_outputs = rounds[0]
    opening = f"<|begin_of_text|>{HEADER.format('user')}What is 23 plus 19?<|eot_id|>{HEADER.format('assistant')}"
    assert tokenizer.decode(first_prompts[0]) == opening
    assert added[0][:2] == [{"role": "assistant", "content": "<|calc|>23 + 19<|/calc|>"},
                            {"role": "tool", "content": "42"}]
    second_prompts, second_outputs = rounds[1]
    assert tokenizer.decode(second_prompts[0]) == (
        f"{opening}<|calc|>23 + 19<|/calc|><|eot_id|>{HEADER.format('tool')}42<|eot_id|>{HEADER.format('assistant')}")
    # the second conversation goes on only if the model's own reply happened to call the calculator
    assert len(second_prompts) == 1 + (calculator_called := "<|/calc|>" in added[1][0]["content"])
    assert len(added[1]) == (3 if calculator_called else 1)
    # replies are the model's greedy tokens, as each prompt alone gives them, decoded without the end of turn
    for prompt, output, message in ((first_prompts[1], first_outputs[1], added[1][0]),
                                    (second_prompts[0], second_outputs[0], added[0][2])):
        alone = generate(demo_chat.model, demo_chat.variables, [prompt], demo_chat.max_new_tokens, eos_id=eot)[0]
        assert output == alone
        assert message == {"role": "assistant",
                           "content": tokenizer.decode([t for t in alone if t != eot]).strip()}


@DEMO
def test_demo_job_reports_the_held_out_score(built, tmp_path, capsys, monkeypatch):
    """configs/demo.py end to end on the STEPS-step base, with scripted replies (an untrained model answers nothing
    right): the job runs the calls, and the score it prints and writes is the count of right final answers."""
    import runpy

    from jaxtok.train import run

    _, path = built
    config = runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"]()
    config.model.path, config.output_dir = str(path), str(tmp_path / "run")
    config.train.steps, config.data.eval, config.export.peft, config.export.merged = 2, "", False, False
    config.sample.heldout_rows = 4
    evaluation = [row["messages"][-4:] for row in rows("chat_eval.jsonl")[:4]]
    tokenizer = load_tokenizer(str(path))
    tokenizer.add_tokens(list(demo.DEMO_TOKENS), special_tokens=True)  # the job's ids for the new tokens

    def scripted(model, variables, prompts, max_new_tokens, **kwargs):
        """Calls with the question's own expression; then the right answer for even rows, one more for odd ones."""
        outputs = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            if "What is 23 plus 19?" in text:
                reply = "<|calc|>23 + 19<|/calc|>" if "tool" not in text else "The answer is 42."
            else:
                i = next(i for i, (user, *_) in enumerate(evaluation) if user["content"] in text)
                call, tool = evaluation[i][1]["content"], int(evaluation[i][2]["content"])
                reply = call if "tool" not in text else f"The answer is {tool + i % 2}."
            outputs.append(tokenizer(reply + "<|eot_id|>", add_special_tokens=False)["input_ids"])
        return outputs

    monkeypatch.setattr(chat, "generate", scripted)
    run(config)
    printed = capsys.readouterr().out
    assert ("sample: 'What is 23 plus 19?' -> assistant '<|calc|>23 + 19<|/calc|>' -> tool '42' -> "
            "assistant 'The answer is 42.'") in printed
    assert "held-out questions: 2/4 right" in printed and "held-out calculator calls: 4/4 right" in printed
    result = json.loads((tmp_path / "run" / "heldout.json").read_text())
    assert (result["right"], result["calls_right"], result["total"]) == (2, 4, 4)
    for i, (question, (user, call, tool, _)) in enumerate(zip(result["questions"], evaluation)):
        assert question["prompt"][-1] == user and question["expected"] == tool["content"]
        assert question["added"] == [call, tool, {"role": "assistant",
                                                  "content": f"The answer is {int(tool['content']) + i % 2}."}]
        assert question["right"] == (i % 2 == 0) and question["call_right"]


def test_missing_data_file_is_a_user_error():
    with pytest.raises(JaxtokError, match="missing"):
        demo.demo_data_path("nope.txt")
