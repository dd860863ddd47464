"""Shared fixtures: tiny HF checkpoints built once per session and cached by their arguments.

Compiled XLA programs are cached on disk for the session (JAX's persistent compilation cache), so the many runs of
scripts/train.py that the tests start as subprocesses compile each tiny program once rather than once per process.
The cache holds the same executables a fresh compile gives, so bit-for-bit checks are unaffected.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_XLA_CACHE = tempfile.mkdtemp(prefix="jaxtok-tests-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)  # before jax is imported, here and in subprocesses
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny programs compile fast, but often

import pytest  # noqa: E402

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """`checkpoint(**make_checkpoint_kwargs)` -> (directory, float32 torch model). Cached: do not modify either;
    copy the directory (`copy_checkpoint`) before corrupting it, and `copy.deepcopy` the torch model before running
    anything that keeps state (dynamic RoPE caches frequencies)."""
    cache = {}

    def get(**kwargs):
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            directory = tmp_path_factory.mktemp("ckpt")
            cache[key] = (directory, tiny.make_checkpoint(directory, **kwargs))
        return cache[key]

    return get


@pytest.fixture
def copy_checkpoint(checkpoint, tmp_path):
    """`copy_checkpoint(**kwargs)` -> (a private copy of the checkpoint's directory, float32 torch model)."""

    def get(**kwargs):
        directory, model = checkpoint(**kwargs)
        target = tmp_path / "ckpt"
        shutil.copytree(directory, target)
        return target, model

    return get


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory) -> tiny.UntrainedRun:
    """One short run with tokens.train_untrained=True (`tiny.untrained_run`), shared by the tests of untrained rows
    and of generation from a run folder."""
    return tiny.untrained_run(tmp_path_factory.mktemp("untrained_run"))
