"""Stopping on SIGTERM or SIGINT without losing work: preemptible machines send SIGTERM and allow a short grace.

While the training loop runs, the two signals only set a flag. The loop finishes the step in flight, saves a
checkpoint at that step and stops with `jaxtok.errors.Stopped` (exit status 128 + the signal). In a multi-process run
a signal may reach some processes only, so they agree after every step (a tiny all-gather): all stop at the same step
and all take part in the checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Callable, Optional, Union

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]  # what signal.signal takes and returns


class StopSignals:
    """A context manager; `requested()` is the signal to stop on (the same in every process), or None."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, Handler] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self) -> Optional[int]:
        received = self.received
        if jax.process_count() > 1:
            received = int(np.max(multihost_utils.process_allgather(np.int32(received))))
        return received or None
