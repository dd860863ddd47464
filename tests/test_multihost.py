"""Two processes of 2 CPU devices each, joined by jax.distributed (gloo collectives), through the real command line.

They must train exactly as one process of 4 devices on the same mesh, write the log and the exports once (process
0), checkpoint, and resume together. The schedule is constant, so a run of 6 steps resumed to 8 is the same
computation as 8 steps in one go, which the one-process reference runs.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mesh_files
import tiny

MESH = "--config.mesh.shape=(1,2,2)"  # fsdp spans the two processes, tensor stays within each
COMMON = (MESH, "--config.optim.schedule=constant", "--config.train.save_every=3", "--config.train.tensorboard=True",
          "--config.export.merged=True")
# The same mesh runs the same partitioned program; only the collectives between the processes go through gloo.
# Observed bit-identical (0 difference) on CPU; the tolerances leave room for a different summation order.
LOSS_TOL = 1e-5  # relative, per logged step
ADAPTER_TOL = 1e-5  # of max|ref|, per tensor
MERGED_TOL = 1e-5
TIMEOUT = 400  # seconds for each phase; every process is killed when it passes or when one process fails

pytestmark = pytest.mark.slow  # several processes train, each through the command line


def _pair(config: Path, out: Path, port: int, group: mesh_files.Group, *overrides: str) -> None:
    for p in range(2):
        group.start(f"process{p}", mesh_files.train_cli(
            config, out, *COMMON, *overrides, f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={p}"),
            mesh_files.env(2, config.parent / "jax_cache"))


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _merged(directory: Path) -> dict:
    tensors = {}
    for f in sorted((directory / "merged").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in (out / "checkpoints").iterdir()), key=lambda n: (not n.isdigit(), n.zfill(9)))


def _events(out: Path) -> list[Path]:
    return sorted((out / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return mesh_files.write_files(tmp_path_factory.mktemp("multihost"))


@pytest.fixture(scope="module")
def runs(files):
    """Phase 1: the 4-device reference (8 steps) beside the 2-process run (6 steps); phase 2: the 2-process run
    resumed to 8 steps. Returns output dirs, {process: log} of each phase, and a snapshot of phase 1."""
    root = files
    config = root / "config.py"
    ref, out = root / "ref", root / "two"

    first = mesh_files.Group(root / "logs1")
    first.start("ref", mesh_files.train_cli(config, ref, *COMMON, "--config.train.steps=8"), mesh_files.env(4))
    _pair(config, out, mesh_files.free_port(), first, "--config.train.steps=6")
    logs1 = first.wait(TIMEOUT)
    snapshot = {
        "records": mesh_files.records(out),
        "checkpoints": _checkpoints(out),
        "events": _events(out),
        "top": sorted(p.name for p in out.iterdir()),
        "adapter_files": _listing(out / "adapter"),
        "merged_files": _listing(out / "merged"),
        "adapter": mesh_files.adapter(out),
    }

    second = mesh_files.Group(root / "logs2")
    _pair(config, out, mesh_files.free_port(), second, "--config.train.steps=8")
    logs2 = second.wait(TIMEOUT)
    return {"ref": ref, "out": out, "logs1": logs1, "logs2": logs2, "phase1": snapshot}


def test_processes_join_into_one_job(runs):
    log0, log1 = runs["logs1"]["process0"], runs["logs1"]["process1"]
    assert "devices: 4 x cpu (2 process(es))" in log0
    assert "devices: 4 x cpu (1 process(es))" in runs["logs1"]["ref"]
    assert "devices:" not in log1 and "PEFT adapter:" not in log1  # process 1 prints nothing of its own


def test_two_processes_train_like_one(runs):
    ref = mesh_files.records(runs["ref"])
    first = runs["phase1"]["records"]
    assert sorted(first) == list(range(1, 7)) and sorted(ref) == list(range(1, 9))
    for step, record in first.items():
        for key in ("loss", "grad_norm"):
            assert abs(record[key] - ref[step][key]) <= LOSS_TOL * abs(ref[step][key]), (step, key)
        assert record["tokens"] == ref[step]["tokens"]


def test_only_process_0_writes_and_writes_everything(runs):
    phase1, ref = runs["phase1"], runs["ref"]
    assert len(phase1["events"]) == 1  # one TensorBoard writer, not one per process
    assert phase1["adapter_files"] == _listing(ref / "adapter")
    assert phase1["merged_files"] == _listing(ref / "merged")
    config = json.loads((runs["out"] / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    expected = mesh_files.adapter(ref)
    assert {k: v.shape for k, v in phase1["adapter"].items()} == {k: v.shape for k, v in expected.items()}
    # the same files as one process writes, nothing half-written or left over (atomic exports build hidden
    # `.NAME.partial-*` directories)
    assert phase1["top"] == sorted(p.name for p in ref.iterdir())
    assert {"adapter", "checkpoints", "merged", "metrics.jsonl", "tensorboard"} <= set(phase1["top"])
    assert not [name for name in phase1["top"] if name.startswith(".")]
    assert sorted(p.name for p in runs["out"].iterdir()) == phase1["top"]


def test_checkpoints_are_written(runs):
    assert runs["phase1"]["checkpoints"] == ["3", "6"]
    assert _checkpoints(runs["out"]) == ["3", "6", "8"]


def test_resume_across_processes_ends_like_one_uninterrupted_run(runs):
    log0 = runs["logs2"]["process0"]
    assert "resuming from the checkpoint at step 6" in log0
    got, ref = mesh_files.records(runs["out"]), mesh_files.records(runs["ref"])
    assert sorted(got) == list(range(1, 9))  # each step once: the resumed run appended steps 7 and 8 only
    for step in ref:
        assert abs(got[step]["loss"] - ref[step]["loss"]) <= LOSS_TOL * abs(ref[step]["loss"]), step
    assert len(_events(runs["out"])) == 2  # one per run, both from process 0
    bad = mesh_files.compare_adapters(mesh_files.adapter(runs["out"]), mesh_files.adapter(runs["ref"]), ADAPTER_TOL)
    assert not bad, bad


def test_merged_export_gathers_the_sharded_base(runs):
    got, ref = _merged(runs["out"]), _merged(runs["ref"])
    assert sorted(got) == sorted(ref) and got
    bad = {k: tiny.rel_err(got[k], ref[k]) for k in ref if not tiny.rel_err(got[k], ref[k]) <= MERGED_TOL}
    assert not bad, bad
    assert all(np.isfinite(v).all() for v in got.values())


def test_an_error_on_one_process_ends_it_promptly(files, tmp_path):
    """A problem only one host sees (here its data file is missing) must end that process with the one-line error
    and exit status 2 (within 10 s), as in a single-process run, not leave the job hanging."""
    group = mesh_files.Group(tmp_path / "logs")
    port = mesh_files.free_port()
    for p in range(2):
        bad = ["--config.data.train=/nonexistent/train.jsonl"] if p == 1 else []
        group.start(f"process{p}", mesh_files.train_cli(
            files / "config.py", tmp_path / "out", MESH, *bad, f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={p}"), mesh_files.env(2))
    _, process1, log1 = group.procs[1]
    try:
        deadline = time.monotonic() + 180
        while not group.reported_error("process1"):
            assert process1.poll() is None and time.monotonic() < deadline, group.tails()
            time.sleep(0.2)
        assert "nonexistent" in log1.read_text()
        try:
            code = process1.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 2, f"the process that failed had not exited 10 s after its error (exit {code})"
    finally:
        group.kill()
