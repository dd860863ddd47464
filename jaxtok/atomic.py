"""Writing a directory so that it is either complete or absent: build it beside the target, then rename it in place.

A failed write removes what it built; only a process killed outright can leave a hidden `.NAME.partial-*`
directory behind, never a target that looks complete.
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
    """Refuses a path that is a file, or a non-empty directory unless `overwrite`."""
    if target.exists() and not target.is_dir():
        raise JaxtokError(f"{target} exists and is a file; choose a directory path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise JaxtokError(f"{target} exists and is not empty; choose another path or pass overwrite=True (--overwrite)")


def _as_if_written_by_user(directory: Path) -> None:
    """Gives the directory and everything in it the modes of files the user writes (0755 and 0644 under the
    usual umask). mkdtemp makes the directory private (0700), and some writers (safetensors) write through a
    private temporary file (0600); an export is meant to be read like any other file."""
    probe = directory / ".mode-probe"  # modes of a fresh file and directory: the umask, without os.umask's race
    probe.touch()
    file_mode = probe.stat().st_mode & 0o777
    probe.unlink()
    probe.mkdir()
    dir_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh directory to fill; when the block succeeds it replaces `target` by rename."""
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield partial
        _as_if_written_by_user(partial)
        if target.exists():
            # Two renames: the old directory is out of the way before the new one takes its name.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old)
            os.rename(partial, target)
            shutil.rmtree(old)
        else:
            os.rename(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
