"""scripts/eval.py end to end, as a user runs it: loss against PyTorch, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "scripts" / "eval.py"
SEQ_LEN = 12
BATCH_SIZE = 4

pytestmark = pytest.mark.slow  # scripts/eval.py end to end, a process each

# 11 rows (not a multiple of BATCH_SIZE): long rows that get cut to SEQ_LEN tokens, short ones, a one-token row (only
# BOS: nothing to predict) and non-ASCII text; a blank line, which is skipped.
TEXTS = [
    " ".join(tiny.CORPUS[:3]),
    tiny.CORPUS[8],  # "Call me Ishmael."
    tiny.CORPUS[3],
    "",
    "Hi",
    tiny.CORPUS[28],
    "naïve café ✓ — déjà vu",
    tiny.CORPUS[16],
    " ".join(tiny.CORPUS[10:14]),
    tiny.CORPUS[13],
    "The cat sat on the mat.",
]


def run_eval(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(EVAL), *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def write_jsonl(path: Path, texts, blank_line_at: int | None = 2) -> Path:
    lines = [json.dumps({"text": t}) for t in texts]
    if blank_line_at is not None:
        lines.insert(blank_line_at, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    """A private copy of the tiny untied checkpoint, with the tiny tokenizer saved next to it."""
    target = tmp_path_factory.mktemp("eval_model") / "model"
    shutil.copytree(checkpoint(), target)
    tokenizer = tiny.make_tokenizer(target)
    return target, tokenizer


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("eval_data") / "data.jsonl", TEXTS)


def torch_eval(hf, tokenizer, texts, seq_len) -> tuple[float, int]:
    """The documented definition: summed next-token cross-entropy over all rows / number of predicted tokens."""
    import torch

    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"][:seq_len]
        if len(ids) < 2:
            continue
        ids_T = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            logits_TV = hf(input_ids=ids_T[None], use_cache=False).logits[0].double()
        total += float(torch.nn.functional.cross_entropy(logits_TV[:-1], ids_T[1:], reduction="sum"))
        count += len(ids) - 1
    return total / count, count


@pytest.fixture(scope="module")
def reference(model_dir, torch_checkpoint):
    _, tokenizer = model_dir
    _, hf = torch_checkpoint()
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    # the data exercises truncation, short rows and a row with nothing to predict
    assert max(lengths) > SEQ_LEN and min(lengths) == 1 and any(2 <= n < SEQ_LEN for n in lengths)
    assert len(TEXTS) % BATCH_SIZE != 0
    return torch_eval(hf, tokenizer, TEXTS, SEQ_LEN)


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output on stdout"
    return json.loads(lines[-1])


def test_eval_loss_matches_torch(model_dir, data_file, reference):
    directory, _ = model_dir
    result = run_eval("--model", directory, "--data", data_file, "--seq-len", SEQ_LEN, "--batch-size", BATCH_SIZE)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = last_json(result.stdout)
    assert set(out) == {"eval_loss", "tokens"}
    loss, tokens = reference
    assert out["tokens"] == tokens
    assert isinstance(out["tokens"], int)
    assert abs(out["eval_loss"] - loss) <= 1e-5 * abs(loss), (out["eval_loss"], loss)


def _bad_input(case: str, tmp: Path) -> tuple[dict, list[str]]:
    """(options replacing the good ones, substrings the error line must contain) for one bad-input case."""
    if case == "missing data file":
        return {"--data": tmp / "does_not_exist.jsonl"}, ["does_not_exist.jsonl", "does not exist"]
    if case == "malformed JSON line":
        path = tmp / "malformed.jsonl"
        path.write_text('{"text": "fine"}\n{"text": "oops"\n')
        return {"--data": path}, ["malformed.jsonl:2", "JSON"]
    if case == "row without text":
        path = tmp / "no_text.jsonl"
        path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"content": "wrong key"}\n')
        return {"--data": path}, ["no_text.jsonl:3", '"text"']
    if case == "empty file":
        path = tmp / "empty.jsonl"
        path.write_text("")
        return {"--data": path}, ["empty.jsonl", "no rows"]
    if case == "seq-len 1":
        return {"--seq-len": 1}, ["--seq-len", "1"]
    if case == "missing model directory":
        return {"--model": tmp / "no_such_model"}, ["no_such_model", "does not exist"]
    if case == "dtype float8":
        return {"--dtype": "float8"}, ["float8"]
    raise ValueError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing data file",
        "malformed JSON line",
        "row without text",
        "empty file",
        "seq-len 1",
        "missing model directory",
        "dtype float8",
    ],
)
def test_bad_input_is_one_error_line(model_dir, data_file, tmp_path, case):
    """Exit non-zero with one `error: ...` line on stderr that names the problem, and no traceback."""
    directory, _ = model_dir
    changes, must_contain = _bad_input(case, tmp_path)
    options = {"--model": directory, "--data": data_file, "--seq-len": SEQ_LEN, **changes}
    result = run_eval(*[x for item in options.items() for x in item])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for text in must_contain:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert '"eval_loss"' not in result.stdout
