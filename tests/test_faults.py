"""Faults a cluster produces, each through the command line: SIGTERM, a damaged checkpoint, two runs on one folder,
a disk that refuses the next checkpoint. Every recovered run ends with the adapter of an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
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
STEPS = 16

pytestmark = pytest.mark.slow  # every test trains through the command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny.write_run_files(
        tmp_path_factory.mktemp("faults"), vocab=300, rows=60,
        **{"lora.rank": 4, "optim.lr": 5e-3, "optim.token_lr": 2e-2, "train.steps": STEPS, "train.batch_size": 4,
           "train.seq_len": 32, "train.save_every": 4, "train.log_every": 2, "sample.max_new_tokens": 0,
           "export.merged": False, "train.tensorboard": False})


def _cli(files: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(SCRIPT), f"--config={files / 'config.py'}", f"--config.output_dir={out}", *overrides]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, f"the run ended before {path} appeared"
        time.sleep(0.02)


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(out: Path, whole: Path) -> None:
    chex.assert_trees_all_equal(_adapter(out), _adapter(whole))


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def whole(files, tmp_path_factory):
    """An uninterrupted run; while it holds its folder, a second run on that folder is refused."""
    out = tmp_path_factory.mktemp("whole") / "run"
    first = subprocess.Popen(_cli(files, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "run.lock", first)
    second = subprocess.run(_cli(files, out), capture_output=True, text=True, timeout=120)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    return out, second


def test_a_second_run_on_the_folder_is_refused(whole):
    out, second = whole
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} is in use by process "), second.stderr
    assert socket.gethostname() in lines[0] and "Traceback" not in second.stderr
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # the first run's log only, no step twice
    assert not (out / "run.lock").exists()  # released at the end


def test_sigterm_saves_the_step_and_resumes_to_the_same_adapter(files, whole, tmp_path):
    whole_out, _ = whole
    out = tmp_path / "run"
    out.mkdir()
    # a lock left by a process that is gone (this host) is taken over with a warning
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "run.lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                              "started": "2026-01-01T00:00:00+00:00"}))
    process = subprocess.Popen(_cli(files, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # after the second checkpoint, so the damaged copy below has an older one to fall back on (a SIGTERM right after
    # the first left the newest as the only one: CI failed on that race once)
    _wait_for(out / "checkpoints" / "8", process)
    process.send_signal(signal.SIGTERM)
    err, _ = process.communicate(timeout=120)  # stdout and stderr together
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert f"warning: {out / 'run.lock'} was held by process {int(gone.stdout)}" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM after step ") and "Run the same command again to resume." in last
    stopped_at = int(last.split("after step ")[1].split(";")[0])
    assert 8 <= stopped_at < STEPS and (out / "checkpoints" / str(stopped_at)).is_dir()
    assert not (out / "adapter").exists() and not (out / "run.lock").exists()

    # a copy whose newest checkpoint then loses its data, as when a node dies while the disk flushes
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)

    result = subprocess.run(_cli(files, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from the checkpoint at step {stopped_at}" in result.stdout
    _assert_same_adapter(out, whole_out)

    newest = damaged / "checkpoints" / str(stopped_at)
    data = [p for p in newest.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    result = subprocess.run(_cli(files, damaged), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and f"{newest} does not restore" in warnings[0], result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    aside = damaged / "checkpoints" / f"{stopped_at}.corrupt"
    assert aside.is_dir() and _digest(aside)  # moved aside, not deleted
    assert "resuming from the checkpoint at step" in result.stdout
    _assert_same_adapter(damaged, whole_out)


def test_no_checkpoint_restores(files, whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole[0], out)
    for p in (out / "checkpoints").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"")
    before = _digest(out / "checkpoints")
    result = subprocess.run(_cli(files, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: no checkpoint in {out / 'checkpoints'} restores"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert _digest(out / "checkpoints") == before  # nothing moved or deleted


def test_a_checkpoint_the_disk_refuses_stops_the_run(files, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_cli(files, out, "--config.train.save_every=8"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "8", process)
    # root ignores file modes, so make the folder immutable: no new entry (the next checkpoint) can go in
    blocked = subprocess.run(["chattr", "+i", str(out / "checkpoints")], capture_output=True, text=True)
    if blocked.returncode != 0:
        process.kill()
        pytest.skip(f"chattr +i is not available here: {blocked.stderr.strip()}")
    try:
        before = _digest(out / "checkpoints" / "8")
        _, err = process.communicate(timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(out / "checkpoints")], check=True)
    assert process.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write the checkpoint of step 16 in {out / 'checkpoints'}: "), err[-2000:]
    assert "Operation not permitted" in last and "the checkpoint of step 8 is intact" in last
    assert "Traceback" not in err
    assert _digest(out / "checkpoints" / "8") == before
