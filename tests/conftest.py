"""Shared fixtures: tiny HF checkpoints built once per session and cached by their arguments."""

from __future__ import annotations

import shutil

import pytest

import tiny


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

