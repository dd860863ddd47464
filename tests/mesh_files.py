"""Shared by test_sharding.py and test_multihost.py: a tiny run's files and helpers to launch and compare runs.

The checkpoint has a vocabulary of 320 (the tokenizer holds ~300), so the added token takes a spare row and every
vocab dimension divides the tensor axis; the head is untied so both token tables exist.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import tiny

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
WORKER = Path(__file__).resolve().parent / "mesh_worker.py"
NEW_TOKEN = tiny.NEW_TOKEN


def write_files(root: Path) -> Path:
    """Checkpoint + tokenizer (root/model), training data (root/train.jsonl) and a config file (root/config.py)."""
    return tiny.write_run_files(
        root, vocab=320, rows=64, **{"lora.rank": 4, "optim.lr": 5e-3, "optim.token_lr": 2e-2, "train.steps": 4,
                                     "train.batch_size": 8, "train.seq_len": 32, "train.save_every": 0,
                                     "train.log_every": 1, "train.tensorboard": False, "export.merged": False})


def env(devices: int, compilation_cache: Path | None = None) -> dict:
    """The environment of a CPU-only child process with `devices` host devices; `compilation_cache`: a directory
    for JAX's persistent compilation cache (a resumed run then reuses the first run's programs)."""
    e = dict(os.environ)
    if compilation_cache is not None:
        e["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
        e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["TF_CPP_MIN_LOG_LEVEL"] = "2"
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), e.get("PYTHONPATH")) if p)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cli(config: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(SCRIPT), f"--config={config}", f"--config.output_dir={output_dir}", *overrides]


class Group:
    """Child processes started together, each logging to its own file; `wait` fails (and kills them all) as soon
    as one exits non-zero, prints an error or a traceback, or the deadline passes, so a test never hangs on a peer
    that died."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env: dict) -> None:
        log = self.log_dir / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.append((name, proc, log))

    def kill(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def wait(self, timeout: float) -> dict[str, str]:
        """Waits for every process to exit 0; returns {name: log text}. Raises AssertionError otherwise."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = {name: proc.poll() for name, proc, _ in self.procs}
                # a process that reported an error counts as failed at once: in a multi-process job it may never
                # exit by itself (its peers wait for it in a collective, it waits for them at shutdown)
                failed = [n for n, c in codes.items() if c not in (None, 0) or self.reported_error(n)]
                if failed:
                    raise AssertionError(f"{failed} failed:\n{self.tails()}")
                if all(c == 0 for c in codes.values()):
                    return {name: log.read_text() for name, _, log in self.procs}
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout:.0f} s:\n{self.tails()}")
                time.sleep(0.1)
        finally:
            self.kill()

    def reported_error(self, name: str) -> bool:
        log = next(log for n, _, log in self.procs if n == name)
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\nerror: " in text or text.startswith("error: ") or "Traceback (most recent call last)" in text

    def tails(self, chars: int = 2500) -> str:
        out = []
        for name, proc, log in self.procs:
            text = log.read_text() if log.exists() else ""
            out.append(f"--- {name} (exit {proc.poll()}):\n{text[-chars:]}")
        return "\n".join(out)


def records(output_dir: Path) -> dict[int, dict]:
    """{step: record} of the step records (those with a loss) of metrics.jsonl; a step logged twice is an error."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in (json.loads(line) for line in lines if line.strip()) if "loss" in r]
    numbers = [r["step"] for r in steps]
    assert len(numbers) == len(set(numbers)), f"steps logged more than once in {output_dir}: {numbers}"
    return {r["step"]: r for r in steps}


def adapter(output_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(output_dir) / "adapter" / "adapter_model.safetensors"))


def compare_adapters(got: dict, ref: dict, tol: float) -> list[str]:
    """Names (with their error) of tensors whose max|got - ref| exceeds tol * max|ref|; missing or extra names too."""
    bad = [f"{k}: missing" for k in ref if k not in got] + [f"{k}: extra" for k in got if k not in ref]
    for k in ref:
        if k in got:
            if got[k].shape != ref[k].shape:
                bad.append(f"{k}: shape {got[k].shape} != {ref[k].shape}")
                continue
            err = tiny.rel_err(got[k], ref[k]) if np.any(ref[k]) else float(np.max(np.abs(got[k])))
            if not err <= tol:
                bad.append(f"{k}: rel err {err:.2e}")
    return bad
