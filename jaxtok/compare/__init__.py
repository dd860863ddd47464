"""The token-training study: each method in jaxtok and in PEFT, from one start, on identical batches.

`scripts/compare.py` runs, per method, a jaxtok worker and then a PEFT worker, each in a process of its own (so each
reports its own peak memory and no framework inherits the other's threads or caches). The jaxtok worker builds the
run exactly as the main job does (`jaxtok.setup.build`) and writes the start that both frameworks share, in
`OUT/runs/METHOD/start/`:

    base/        a Hugging Face checkpoint (float32) of the base with the run's vocabulary: added tokens' rows at
                 their initial values
    adapter/     the initial adapter in PEFT's format: jaxtok's LoRA init (B = 0) and token rows; none for a method
                 without either
    data.npz     every training batch, train_<key> [steps, A, B, T], and the evaluation rows, eval_<key> [E, T], for
                 <key> in tokens, positions, segment_ids, loss_mask (`jaxtok.data`'s layout: segment 0 is padding, rows
                 of one sequence attend within their segment only)
    plan.json    the method, steps, evaluation steps, the learning-rate multiplier of every step (optax's schedule,
                 which PyTorch's LambdaLR then follows), AdamW's settings per group, clipping and the new-token ids

Then it trains and the PEFT worker (`jaxtok.compare.peft_worker`) trains from that start. Both report
`RESULT_FIELDS`; `jaxtok.compare.report` writes results.json, report.md and the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

FRAMEWORKS = ("jaxtok", "peft")
PROGRESS = "COMPARE_PROGRESS "  # a worker's stdout line: "COMPARE_PROGRESS <steps done> <steps>"
RESULT = "COMPARE_RESULT "  # a worker's last stdout line: this, then the result as JSON
RESULT_FIELDS = ("framework", "method", "trainable_params", "eval_loss_before", "eval_loss_after",
                 "new_token_acc_before", "new_token_acc_after", "step_ms", "peak_memory_mb", "losses", "evals",
                 "device")
DATA_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def start_dir(out: Path, method: str) -> Path:
    return Path(out) / "runs" / method / "start"


def read_plan(start: Path) -> dict:
    return json.loads((Path(start) / "plan.json").read_text())


def report_progress(done: int, total: int) -> None:
    print(f"{PROGRESS}{done} {total}", flush=True)


def report_result(result: dict) -> None:
    print(RESULT + json.dumps(result), flush=True)


def peak_memory_mb() -> float:
    """This process's peak resident memory (ru_maxrss), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
