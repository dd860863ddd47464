"""Training checkpoints with orbax: the trainable state only, never the frozen base.

A checkpoint holds what a resumed run needs to continue bit for bit: the trainable parameters, the optimizer state,
the step, the RNG (as raw key data) and a small JSON record (data position, token ids, config digest). The base is
re-read from its checkpoint and the data order is a function of (seed, step), so neither is stored.

orbax writes each step into a temporary directory and renames it when complete, so a run killed while saving leaves
the previous checkpoint intact and the next run resumes from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxtok.step import TrainState


def _to_saveable(state: TrainState) -> dict:
    return {
        "step": state.step,
        "trainable": state.trainable,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }


class Checkpoints:
    """`output_dir/checkpoints`: save every so often, keep the last `keep`, restore the latest."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, record: dict[str, Any]) -> None:
        step = int(state.step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state)), record=ocp.args.JsonSave(record))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, like: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
        """The state saved at `step` (default: the latest), shaped like `like`, and its JSON record."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        saved = restored["state"]
        state = TrainState(saved["step"], saved["trainable"], saved["opt_state"], jax.random.wrap_key_data(saved["rng"]))
        return state, dict(restored["record"])

    def close(self) -> None:
        self.manager.close()
