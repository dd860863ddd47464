"""Training checkpoints with orbax: the trainable state only, never the frozen base.

A checkpoint holds what a resumed run needs to continue bit for bit: the trainable parameters, the optimizer state,
the step, the RNG (as raw key data) and a small JSON record that the training job writes: the step and its epoch, and
what identifies the run, which a resumed run must match (its method, vocabulary size and token rows' ids, and the
ids of untrained rows that train, if any). The base is re-read from its checkpoint and the data order is a function
of (seed, step), so neither is stored.

orbax writes each step into a temporary directory and renames it when complete, so a run killed while saving leaves
the previous checkpoint intact and the next run resumes from it. A checkpoint damaged later (a node that died while
its disk flushed) is found on resume: `restore_newest` moves it aside as `N.corrupt` (never deleting it) and resumes
from the newest one that restores. A save the disk refuses (full, read-only) stops the run with one line; the
previous checkpoints stay as they were.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from jaxtok.errors import DISK_ERRORS, JaxtokError
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
        try:
            self.manager.save(step, args=args, force=True)
            self.manager.wait_until_finished()
        except Exception as e:
            cause = _os_error(e)
            if cause is None:
                raise
            kept = self.latest_step()
            raise JaxtokError(f"could not write the checkpoint of step {step} in {self.directory}: {cause.strerror}"
                              f"{f' ({cause.filename})' if cause.filename else ''}; "
                              + (f"the checkpoint of step {kept} is intact" if kept is not None
                                 else "no checkpoint was saved")) from None

    def restore_newest(self, like: TrainState, warn: Callable[[str], None]) -> Optional[tuple[TrainState, dict]]:
        """`restore(like)` of the newest checkpoint that restores (None if there is none at all).

        Newer ones that do not restore are moved aside as `N.corrupt`, each with a warning naming it and why. If none
        restores, nothing is moved and a JaxtokError says so.
        """
        steps = sorted(self.steps(), reverse=True)
        failed: list[tuple[int, str]] = []
        for step in steps:
            try:
                with _quiet():
                    restored = self.restore(like, step)
            except Exception as e:  # orbax raises whatever its storage layer met: any of them means unreadable
                failed.append((step, _reason(e)))
                continue
            for bad, reason in failed:
                aside = self._move_aside(bad)
                warn(f"warning: checkpoint {self.directory / str(bad)} does not restore ({reason}); "
                     f"moved it to {aside}")
            if failed:
                self.manager.reload()  # orbax lists the steps once, when it opens the directory
            return restored
        if failed:
            step, reason = failed[0]
            raise JaxtokError(f"no checkpoint in {self.directory} restores (the newest, step {step}: {reason}); "
                              "nothing was moved or deleted: move the directory away to start the run over")
        return None

    def _move_aside(self, step: int) -> Path:
        source, n = self.directory / str(step), 0
        target = self.directory / f"{step}.corrupt"
        while target.exists():
            n += 1
            target = self.directory / f"{step}.corrupt-{n}"
        os.rename(source, target)
        return target


    def restore(self, like: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
        """The state saved at `step` (default: the latest), shaped like `like`, and its JSON record."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        saved = restored["state"]
        state = TrainState(saved["step"], saved["trainable"], saved["opt_state"],
                           jax.random.wrap_key_data(saved["rng"]), like.residuals)  # scratch: never saved
        return state, dict(restored["record"])

    def record(self, step: Optional[int] = None) -> dict:
        """The JSON record saved at `step` (default: the latest), without the state."""
        step = self.latest_step() if step is None else step
        return dict(self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"])

    def close(self) -> None:
        self.manager.close()


def _os_error(e: Optional[BaseException]) -> Optional[OSError]:
    """The OSError of a refused write somewhere in the chain of `e` (orbax wraps what its storage layer raises)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[0][:200]


class _quiet:
    """Silences what orbax and its storage threads print while a checkpoint is tried (logs, and tracebacks that
    tensorstore's threads print straight to the stderr file descriptor): a failure becomes one warning line.

    After a failure the threads go on printing for a moment (longer on a loaded machine), so stderr stays redirected
    until what they write has been still for half a second (at most 10 s). asyncio's logger stays silenced: it would
    report the abandoned reads again when the process exits.
    """

    def __enter__(self):
        self.level = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.FATAL)
        logging.disable(logging.CRITICAL)
        sys.stderr.flush()
        self.saved_fd = os.dup(2)
        self.sink = tempfile.TemporaryFile()
        os.dup2(self.sink.fileno(), 2)

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            size, still_since, deadline = -1, time.monotonic(), time.monotonic() + 10
            while time.monotonic() < deadline and time.monotonic() - still_since < 0.5:
                time.sleep(0.1)
                now = os.fstat(self.sink.fileno()).st_size
                if now != size:
                    size, still_since = now, time.monotonic()
        sys.stderr.flush()
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)
        self.sink.close()
        absl_logging.set_verbosity(self.level)
        logging.disable(logging.NOTSET)
