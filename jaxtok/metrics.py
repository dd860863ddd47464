"""Where training numbers go: `metrics.jsonl` (one JSON object per logged step or evaluation) and TensorBoard.

Only process 0 writes, so a multi-host run produces one log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax


class MetricsWriter:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Appends `record` (it must hold `step`) as one line, and its numbers to TensorBoard."""
        if not self.enabled:
            return
        record = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def drop_after(output_dir: str | Path, step: int) -> None:
    """Removes records a run resumed at `step` writes again (later steps, and evaluations at `step` itself), so the
    log never holds a step twice."""
    path = Path(output_dir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    kept = [r for r in read_metrics(output_dir)
            if r["step"] < step or (r["step"] == step and "eval_loss" not in r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
