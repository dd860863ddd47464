"""The main job through its command line: a short run end to end, resume after SIGKILL, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest
from safetensors.numpy import load_file

import tiny
from jaxtok.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"

pytestmark = pytest.mark.slow  # scripts/train.py end to end


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny untied checkpoint with a tokenizer, train/eval text data using a new token, and a config file."""
    # vocab 300: the tokenizer fills it, so the new token grows the vocabulary
    return tiny.write_run_files(
        tmp_path_factory.mktemp("train_cli"), vocab=300, rows=60, eval_rows=6,
        **{"lora.rank": 4, "lora.dropout": 0.1, "optim.lr": 5e-3, "optim.token_lr": 2e-2, "train.steps": 16,
           "train.batch_size": 4, "train.seq_len": 32, "train.save_every": 4, "train.log_every": 2,
           "train.eval_every": 8, "sample.prompt": "The cat", "sample.max_new_tokens": 6})


def _cli(config: Path, output_dir: Path, *overrides: str, **popen) -> list[str]:
    return [sys.executable, str(SCRIPT), f"--config={config}", f"--config.output_dir={output_dir}", *overrides]


def _adapter(output_dir: Path) -> dict:
    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def finished_run(files, tmp_path_factory):
    """(output_dir, completed process) of one short run through the command line."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run(_cli(files / "config.py", out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_short_run_end_to_end(finished_run):
    out, result = finished_run
    assert "token rows (embedding): 300 '<|x|>', 1 '<|end_of_text|>'" in result.stdout + result.stderr
    records = read_metrics(out)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(steps[0])
    assert (out / "tensorboard").is_dir() and list((out / "tensorboard").iterdir())
    assert max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == 16
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (out / "adapter" / "tokenizer.json").exists()
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["vocab_size"] == 301 and merged["tie_word_embeddings"] is False
    assert "sample: 'The cat' ->" in result.stdout + result.stderr
    # exports are readable like any file the user writes (safetensors writes through a private temporary file)
    probe = out / "probe"
    probe.touch()
    user_mode = probe.stat().st_mode & 0o777
    probe.unlink()
    written = [out / "metrics.jsonl", out / "run_config.json", *[f for d in ("adapter", "merged", "tokenizer")
                                                                 for f in (out / d).rglob("*")]]
    assert {f.relative_to(out).as_posix(): oct(f.stat().st_mode & 0o777) for f in written if f.is_file()} == {
        f.relative_to(out).as_posix(): oct(user_mode) for f in written if f.is_file()}


def test_killed_run_resumes_to_the_same_adapter(files, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_cli(files / "config.py", whole), check=True, capture_output=True, timeout=300)

    resumed = tmp_path / "resumed"
    overrides = ["--config.train.save_every=2"]
    process = subprocess.Popen(_cli(files / "config.py", resumed, *overrides), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (resumed / "checkpoints" / "6").is_dir():  # orbax renames a checkpoint into place when complete
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "adapter").exists()
    result = subprocess.run(_cli(files / "config.py", resumed, *overrides), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from the checkpoint at step" in result.stdout + result.stderr
    chex.assert_trees_all_equal(_adapter(resumed), _adapter(whole))
    steps = [r["step"] for r in read_metrics(resumed) if "loss" in r]
    assert steps == list(range(1, 17))  # no step logged twice


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """Runs scripts/train.py in this process (same code path as the command), returning (exit code, stderr)."""
    code, _, err = tiny.run_script(SCRIPT, argv, capsys)
    return code, err


def _bad_inputs(files: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (tmp_path / "a_file").write_text("x")
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                     "model_type": "mistral"}))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in os.listdir(files / "model"):
        data = (files / "model" / name).read_bytes()
        (corrupt / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    return [
        (["--config.model.path=/nonexistent/model"], "model directory /nonexistent/model does not exist"),
        ([f"--config.model.path={mistral}"], "MistralForCausalLM"),
        ([f"--config.model.path={corrupt}"], "truncated or corrupt"),
        (["--config.tokens.train=('<|nope|>',)"], "tokens.train: unknown token '<|nope|>'"),
        (["--config.sample.stop=<|eot_id|>"], "sample.stop: unknown token '<|eot_id|>'"),
        (["--config.tokens.add=('<|a|>', '<|a|>')"], "listed twice"),
        (["--config.tokens.train=(5000,)"], "token id 5000 is out of range"),
        (["--config.data.train=/nonexistent.jsonl"], "/nonexistent.jsonl"),
        ([f"--config.data.train={tmp_path / 'empty.jsonl'}"], "empty.jsonl"),
        ([f"--config.data.train={tmp_path / 'broken.jsonl'}"], "broken.jsonl"),
        (["--config.data.format=prompt_completion"], "prompt"),
        (["--config.lora.rnak=4"], "unknown config key lora.rnak"),
        (["--config.lora.rank=0"], "rank"),
        (["--config.train.batch_size=0"], "train.batch_size"),
        (["--config.train.steps=-1"], "train.steps"),
        (["--config.train.seq_len=1"], "train.seq_len"),
        (["--config.optim.lr=nan"], "optim.lr"),
        (["--config.optim.token_lr=inf"], "optim.token_lr"),
        (["--config.model.dtype=float8"], "model.dtype"),
        ([f"--config.output_dir={tmp_path / 'a_file'}"], "is a file"),
        (["--config.sample.calculator=True"], "need chat data (messages), not text"),
        ([f"--config.sample.heldout={tmp_path / 'broken.jsonl'}"], "need chat data (messages), not text"),
        (["--config.sample.heldout=x.jsonl", "--config.sample.heldout_rows=0"], "sample.heldout_rows"),
    ]


def test_bad_input_gives_one_line_and_no_traceback(files, tmp_path, capsys):
    failures = []
    for overrides, expected in _bad_inputs(files, tmp_path):
        argv = [f"--config={files / 'config.py'}", f"--config.output_dir={tmp_path / 'out'}", *overrides]
        code, err = _run_in_process(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        ok = code not in (0, None) and lines and lines[-1].startswith("error: ") and expected in lines[-1]
        if not ok or "Traceback" in err:
            failures.append(f"{overrides}: exit {code}, stderr {err[-500:]!r}")
    assert not failures, "\n".join(failures)


def test_bad_input_through_the_real_command(files, tmp_path):
    result = subprocess.run(_cli(files / "config.py", tmp_path / "out", "--config.train.stpes=3"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown config key train.stpes in --config.train.stpes=3; did you mean train.steps?"
    )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(files, tmp_path):
    out = tmp_path / "nan"
    overrides = ["--config.optim.lr=1e30", "--config.optim.token_lr=1e30", "--config.optim.max_grad_norm=0.0",
                 "--config.train.save_every=1", "--config.train.log_every=1", "--config.train.eval_every=0"]
    result = subprocess.run(_cli(files / "config.py", out, *overrides), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss became") and "the checkpoint at step" in last
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and f"the checkpoint at step {saved[-1]} is kept" in last
    assert not (out / "adapter").exists()


def test_export_and_eval_commands(files, finished_run, tmp_path):
    run, _ = finished_run
    script = lambda name: str(ROOT / "scripts" / name)  # noqa: E731
    peft_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    for fmt, target in (("peft", peft_dir), ("merged", merged_dir)):
        result = subprocess.run([sys.executable, script("export.py"), f"--run={run}", "--step=16", f"--format={fmt}",
                                 f"--out={target}"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    # the checkpoint at the last step exports to exactly what the run exported at its end
    chex.assert_trees_all_equal(load_file(str(peft_dir / "adapter_model.safetensors")), _adapter(run))
    assert load_file(str(merged_dir / "model.safetensors")).keys() == load_file(
        str(run / "merged" / "model.safetensors")).keys()
    # an existing target is refused without --overwrite, and nothing else is said
    refused = subprocess.run([sys.executable, script("export.py"), f"--run={run}", "--format=peft",
                              f"--out={peft_dir}"], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {peft_dir} exists and is not empty")
    # evaluating the adapter on the base equals evaluating the merged checkpoint
    losses = []
    for model, extra in ((files / "model", [f"--adapter={peft_dir}"]), (merged_dir, [])):
        command = [sys.executable, script("eval.py"), f"--model={model}", f"--data={files / 'eval.jsonl'}",
                   "--seq-len=32", *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        losses.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert losses[0]["tokens"] == losses[1]["tokens"]
    assert abs(losses[0]["eval_loss"] - losses[1]["eval_loss"]) <= 1e-5 * losses[1]["eval_loss"]
