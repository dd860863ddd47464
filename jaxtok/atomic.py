"""Writing a directory so that it is either complete or absent: build it beside the target, then rename it in place.

An interrupted write leaves only a hidden `.NAME.partial-*` directory, never a target that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from jaxtok.errors import JaxtokError


def check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise JaxtokError(f"{target} exists and is a file; choose a directory path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise JaxtokError(f"{target} exists and is not empty; choose another path or pass --overwrite")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh directory to fill; on success it replaces `target` in one rename."""
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield partial
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(partial, target)
            shutil.rmtree(old)
        else:
            os.rename(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
