"""The train step with its layers' residuals in persistent buffers (jaxtok.layer_stack) computes what autodiff of the
layer scan computes, for every method, and keeps those residuals out of XLA's scratch memory."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import tiny
from jaxtok import trainable
from jaxtok.convert import load_pretrained
from jaxtok.lora import LoraConfig
from jaxtok.step import init_state, make_train_step, residual_buffers
from jaxtok.tokens import TokenRows

IDS = (7, 11, 300)


def _batch(A, B=2, T=12, seed=0):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, 320, (A, B, T))
    tokens[rs.rand(A, B, T) < 0.3] = IDS[0]
    ones = np.ones((A, B, T), np.int32)
    return dict(tokens=tokens, positions=np.broadcast_to(np.arange(T), (A, B, T)), segment_ids=ones, loss_mask=ones)


@pytest.mark.slow
@pytest.mark.parametrize("method,tied,remat,A,family", [
    ("lora", True, "none", 1, {}),
    ("lora+rows", False, "none", 2, {}),
    ("lora+full", True, "none", 1, {}),
    ("rows", False, "none", 1, {}),
    ("lora+rows", True, "full", 1, {}),
    ("lora", False, "dots", 2, {}),
    ("lora+rows", False, "none", 1, dict(family="mistral", sliding_window=4)),
    ("lora", True, "none", 1, dict(family="qwen3")),
], ids=["lora", "rows-micro", "full", "rows-only", "remat-full", "remat-dots-micro", "mistral-window", "qwen3"])
def test_buffered_step_equals_autodiff(checkpoint, method, tied, remat, A, family):
    base, params = load_pretrained(str(checkpoint(tied=tied, **family)))
    lora = None if method == "rows" else LoraConfig(rank=4, alpha=8, targets="all-linear")
    rows = () if method == "lora" else IDS
    model = base.clone(lora=lora, token_rows=TokenRows(rows, () if tied else rows), remat=remat)
    adapters = jax.tree.map(lambda x: x + 0.1, trainable.init_adapters(model, params, jax.random.key(0)))
    train, frozen = trainable.split({"params": params, **adapters}, method)
    sgd = optax.sgd(100.0)  # the update is a multiple of the gradient, well above the parameters' rounding
    step = make_train_step(model, sgd, optax.constant_schedule(100.0), donate=False)
    batch = _batch(A)
    plain, plain_metrics = step(init_state(train, sgd, 0), frozen, batch)
    buffered = init_state(train, sgd, 0).replace(residuals=residual_buffers(model, train, frozen, batch))
    for _ in range(2):  # the second step reads buffers the first one wrote
        state, metrics = step(buffered, frozen, batch)
    assert jax.tree.structure(state.residuals) == jax.tree.structure(buffered.residuals)
    np.testing.assert_allclose(float(metrics["loss"]), float(plain_metrics["loss"]), rtol=1e-6)
    for path, expected in jax.tree_util.tree_flatten_with_path(plain.trainable)[0]:
        start = np.asarray(_at(train, path))
        got = np.asarray(_at(state.trainable, path))
        assert tiny.rel_err(got - start, np.asarray(expected) - start) < 1e-5, jax.tree_util.keystr(path)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.slow
def test_buffers_take_the_residuals_out_of_scratch_memory(checkpoint):
    """XLA's scratch for the step shrinks by about what the buffers hold: the layers' residuals live there now."""
    base, params = load_pretrained(str(checkpoint(tied=True)))
    model = base.clone(lora=LoraConfig(rank=4, alpha=8, targets="all-linear"))
    train, frozen = trainable.split({"params": params, **trainable.init_adapters(model, params, jax.random.key(0))})
    sgd = optax.sgd(1.0)
    step = make_train_step(model, sgd, optax.constant_schedule(1.0))
    batch = _batch(1, B=4, T=32)
    state = init_state(train, sgd, 0)
    plain = step.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes
    buffers = residual_buffers(model, train, frozen, batch)
    buffered = step.lower(state.replace(residuals=buffers), frozen, batch).compile().memory_analysis()
    held = sum(a.nbytes for a in jax.tree.leaves(buffers))
    assert buffered.temp_size_in_bytes < plain - 0.8 * held
