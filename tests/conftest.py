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
    """`checkpoint(**make_checkpoint_kwargs)` -> the directory of a tiny checkpoint (`tiny.make_checkpoint`).
    Cached: do not modify it; copy it (`copy_checkpoint`) before corrupting it."""
    cache = {}

    def get(**kwargs):
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            cache[key] = tiny.make_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)
        return cache[key]

    return get


@pytest.fixture
def copy_checkpoint(checkpoint, tmp_path):
    """`copy_checkpoint(**kwargs)` -> a private copy of the checkpoint's directory."""

    def get(**kwargs):
        target = tmp_path / "ckpt"
        shutil.copytree(checkpoint(**kwargs), target)
        return target

    return get


@pytest.fixture(scope="session")
def tiny_torch():
    """The `tiny_torch` helpers, for the tests that compare with PyTorch: they skip where torch is not installed."""
    pytest.importorskip("torch")
    import tiny_torch

    return tiny_torch


@pytest.fixture(scope="session")
def torch_checkpoint(checkpoint, tiny_torch):
    """`torch_checkpoint(**kwargs)` -> (the checkpoint's directory, the float32 torch model transformers loads from
    it). Cached: `copy.deepcopy` the model before running anything that keeps state (dynamic RoPE caches
    frequencies)."""
    cache = {}

    def get(**kwargs):
        directory = checkpoint(**kwargs)
        if directory not in cache:
            cache[directory] = (directory, tiny_torch.load_model(directory))
        return cache[directory]

    return get


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory) -> tiny.UntrainedRun:
    """One short run with tokens.train_untrained=True (`tiny.untrained_run`), shared by the tests of untrained rows
    and of generation from a run folder."""
    return tiny.untrained_run(tmp_path_factory.mktemp("untrained_run"))
