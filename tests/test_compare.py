"""scripts/compare.py on a tiny checkpoint: both frameworks from one start on the same batches agree step by step, and
every output is there; bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny
from jaxtok.compare import RESULT_FIELDS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare.py"
METHODS = ("lora+full", "rows")  # lora and lora+rows against PEFT: tests/test_peft_parity.py, test_methods.py
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    # packed rows (data.packing) and two micro-batches: the PEFT side must honour segments and accumulation too
    return tiny.write_run_files(
        tmp_path_factory.mktemp("compare"), vocab=300, rows=40, eval_rows=6,
        **{"lora.rank": 4, "optim.lr": 5e-3, "optim.token_lr": 2e-2, "optim.warmup_steps": 2, "train.steps": 6,
           "train.batch_size": 2, "train.grad_accum": 2, "train.seq_len": 32, "train.eval_every": 3,
           "tokens.train_head": "all"})  # PEFT's rows-only adapter: one id list for embedding and head


def _compare(files: Path, out: Path, *args: str, runner: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, *runner, str(SCRIPT), "--config", str(files / "config.py"), f"--out={out}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


STUDY = pytest.mark.slow  # both frameworks train every method


@pytest.fixture(scope="module")
def study(files, tmp_path_factory):
    pytest.importorskip("torch")  # the study runs PEFT beside jaxtok
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("study")
    proc = _compare(files, out, f"--methods={','.join(METHODS)}", "--frameworks=jaxtok,peft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@STUDY
def test_both_frameworks_agree_step_by_step(study):
    out, proc = study
    results = json.loads((out / "results.json").read_text())
    runs = {(r["framework"], r["method"]): r for r in results["runs"]}
    assert set(runs) == {(f, m) for f in ("jaxtok", "peft") for m in METHODS}
    for run in runs.values():
        assert set(RESULT_FIELDS) <= set(run)
        assert len(run["losses"]) == 6 and [e["step"] for e in run["evals"]] == [0, 3, 6]
        assert run["eval_loss_after"] < run["eval_loss_before"]
        assert run["step_ms"] > 0 and run["peak_memory_mb"] > 0
        assert 0 <= run["new_token_acc_after"] <= 1
    for method in METHODS:
        jax_run, torch_run = runs["jaxtok", method], runs["peft", method]
        assert jax_run["trainable_params"] == torch_run["trainable_params"]
        np.testing.assert_allclose(jax_run["losses"], torch_run["losses"], rtol=1e-4)
        for a, b in zip(jax_run["evals"], torch_run["evals"]):
            assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-4 * b["eval_loss"]
            assert a["new_token_acc"] == pytest.approx(b["new_token_acc"])
        assert results["max_rel_loss_diff"][method] <= 1e-4
    # token rows train a handful of rows; the full method trains the whole embedding and head
    assert runs["jaxtok", "rows"]["trainable_params"] < runs["jaxtok", "lora+full"]["trainable_params"] / 20


@STUDY
def test_report_and_plots(study):
    out, proc = study
    report = (out / "report.md").read_text()
    for method in METHODS:
        assert f"| {method} | jaxtok |" in report and f"| {method} | peft |" in report
    assert "machine:" in report and "cores" in report and "![losses](loss.png)" in report
    for name in ("loss.png", "cost.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    assert "largest relative difference of the per-step loss" in proc.stdout
    assert "peft rows" in proc.stderr  # the progress bar names the run going


def test_attention_mask_of_packed_and_padded_rows():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from jaxtok.compare.peft_worker import attention_mask

    segments = np.array([[1, 1, 2, 2, 0]])
    allowed = attention_mask(torch.tensor(segments), torch.float32)[0, 0].numpy() == 0
    want = np.array([[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [0, 0, 1, 0, 0],
                     [0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 1]], bool)  # padding sees itself only, and nobody sees padding
    np.testing.assert_array_equal(allowed, want)


@pytest.mark.parametrize("args, message", [
    (("--methods=lora,full",), "error: unknown method 'full'; choose from lora, lora+rows, lora+full, rows"),
    (("--frameworks=jax",), "error: unknown framework 'jax'; choose from jaxtok, peft"),
    # jaxtok alone: both frameworks would first need torch and peft, which test_peft_asked_for_but_not_installed checks
    (("--frameworks=jaxtok", "--config.train.stepz=3"), "error: unknown config key train.stepz"),
])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, args, message):
    proc = _compare(files, tmp_path / "out", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_peft_asked_for_but_not_installed(files, tmp_path):
    proc = _compare(files, tmp_path / "out", "--methods=rows", runner=(str(ROOT / "tests" / "no_torch_runner.py"),))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: torch, peft not installed") and proc.stderr.count("\n") == 1, proc.stderr
