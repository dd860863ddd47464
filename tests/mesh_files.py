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
NEW_TOKEN = "<|x|>"


def write_files(root: Path) -> Path:
    """Checkpoint + tokenizer (root/model), training data (root/train.jsonl) and a config file (root/config.py)."""
    root = Path(root)
    tiny.make_checkpoint(root / "model", tied=False, vocab=320)
    tiny.make_tokenizer(root / "model")
    with open(root / "train.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": f"{tiny.CORPUS[i % len(tiny.CORPUS)]} {NEW_TOKEN} {i % 7}"}) + "\n")
    (root / "config.py").write_text(
        "from jaxtok.run_config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.model.path = {str(root / 'model')!r}\n"
        "    c.model.dtype = 'float32'\n"
        f"    c.data.train = {str(root / 'train.jsonl')!r}\n"
        f"    c.tokens.add = ({NEW_TOKEN!r},)\n"
        "    c.tokens.train = ('<|end_of_text|>',)\n"
        "    c.lora.rank = 4\n"
        "    c.optim.lr = 5e-3\n"
        "    c.optim.token_lr = 2e-2\n"
        "    c.train.steps = 4\n"
        "    c.train.batch_size = 8\n"
        "    c.train.seq_len = 32\n"
        "    c.train.save_every = 0\n"
        "    c.train.log_every = 1\n"
        "    c.train.tensorboard = False\n"
        "    c.export.merged = False\n"
        "    return c\n"
    )
    return root


def env(devices: int) -> dict:
    """The environment of a CPU-only child process with `devices` host devices."""
    e = dict(os.environ)
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
    """Child processes started together, each logging to its own file; `wait` fails (and kills the others) as soon
    as one fails or the deadline passes, so a test can never hang on a peer that died."""

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
                failed = [n for n, c in codes.items() if c not in (None, 0)]
                if failed:
                    raise AssertionError(f"{failed} failed:\n{self.tails()}")
                if all(c == 0 for c in codes.values()):
                    return {name: log.read_text() for name, _, log in self.procs}
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout:.0f} s:\n{self.tails()}")
                time.sleep(0.1)
        finally:
            self.kill()

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
