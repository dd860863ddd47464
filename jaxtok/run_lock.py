"""One run per output folder: `output_dir/run.lock` names the process, host and start time of the run that holds it.

A second run on the folder stops at once, naming the holder, before it writes anything there. A lock left by a
process that is gone (killed outright, on this host) is taken over with a warning; a lock from another host cannot
be checked, so the message says which file to remove once that run is known to be over. In a multi-process run,
process 0 holds the lock and every process learns whether it got it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Callable

from jaxtok.errors import JaxtokError

LOCK_NAME = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self, warn: Callable[[str], None]) -> None:
        """Takes the lock or raises a JaxtokError naming its holder."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        for _ in range(2):  # a second try after taking over a dead holder's lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    warn(f"warning: {self.path} was held by process {holder['pid']} (started {holder.get('started')}),"
                         " which is gone; taking it over")
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"process {holder['pid']} on {holder.get('host')} (started {holder.get('started')})"
                       if "pid" in holder else "a run that is starting")
                raise JaxtokError(f"{self.path.parent} is in use by {who}; wait for it to end or choose another "
                                  f"output_dir (if that run is gone, remove {self.path})") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise JaxtokError(f"{self.path} keeps reappearing; another run is starting on {self.path.parent}")

    def _holder(self) -> dict:
        try:
            value = json.loads(self.path.read_text())
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):  # gone meanwhile, or being written
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
