"""The layer stack's backward with its residuals in buffers that outlive the train step.

Why. Under autodiff of the layer scan, what the backward keeps of every layer lives in XLA's scratch memory for the
step, and on CPU that scratch is mapped afresh every step: the step starts by zero-filling the stacked residual
buffers (a scan's outputs start as zeros), faulting in each of their pages, and ends by unmapping them. At shape M of
`scripts/benchmark.py` (8 layers, 496 MiB of residuals, 712 MiB of scratch) that was 182k page faults per step, the
first ~190 ms of the 3.9 s step without a matmul, and a 45 ms `munmap` between steps (JAX profiler, strace). Here
the forward writes the residuals into buffers that come into the jitted step donated (in `TrainState.residuals`)
and go out of it, so every step reuses the same memory. At shape M: 54k page faults per step instead of 182k, system
time 0.11 s instead of 0.33, scratch 212 MiB beside 504 MiB of buffers (712 MiB before), and the LoRA step faster in
each of 4 interleaved pairs of processes (by 196, 135, 105 and 25 ms; a first version of this in one process: by
143 and 147 ms in the median of 10 and 8 interleaved pairs, faster in every pair). On an accelerator, whose
allocator keeps device memory from step to step, the buffers save only the zero-fill.

How. The forward scan takes each layer's pullback with `jax.vjp`; a pullback is a pytree whose leaves are its
residuals. Leaves that are one of the layer's inputs other than x (its slice of the frozen or trained stacks, the
RoPE tables, the mask) are found by identity and taken again in the backward; the others go into the buffers,
stacked over layers. The backward scan rebuilds each layer's pullback from the buffers and runs it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp

# layer(frozen_l, trained_l, x, consts, xs_l) -> x: one layer, with its slices of the stacked frozen and trained
# trees, the constants every layer reads (e.g. RoPE tables and mask) and its own slice of `xs_L` (e.g. its window).
Layer = Callable[[Any, Any, jnp.ndarray, Any, Any], jnp.ndarray]


def _num_layers(stacked) -> int:
    return jax.tree_util.tree_leaves(stacked)[0].shape[0]


def _at(tree, layer):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), tree)


def _pullback(layer: Layer, frozen_l, trained_l, x, consts, xs_l):
    """Layer output, the pullback's treedef, and per leaf of the pullback the index of the same array among the
    layer's inputs (None: a residual the buffers keep) with the leaves kept."""
    y, pullback = jax.vjp(lambda t, x: layer(frozen_l, t, x, consts, xs_l), trained_l, x)
    leaves, treedef = jax.tree_util.tree_flatten(pullback)
    inputs = jax.tree_util.tree_leaves((frozen_l, trained_l, consts, xs_l))
    where = tuple(next((i for i, a in enumerate(inputs) if leaf is a), None) for leaf in leaves)
    return y, treedef, where, [leaf for leaf, w in zip(leaves, where) if w is None]


def residual_shapes(layer: Layer, frozen_L, trained_L, x, consts, xs_L) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes of the buffers `scan_layers` needs: one per kept residual of a layer, stacked over layers."""
    L = _num_layers(frozen_L)
    kept = jax.eval_shape(lambda: _pullback(layer, _at(frozen_L, 0), _at(trained_L, 0), x, consts, _at(xs_L, 0))[3])
    return tuple(jax.ShapeDtypeStruct((L, *a.shape), a.dtype) for a in kept)


class _Saved:
    """The buffers, with how to put them back into a pullback (static, so it can ride in custom_vjp residuals)."""

    def __init__(self, buffers, treedef, where):
        self.buffers, self.treedef, self.where = buffers, treedef, where


jax.tree_util.register_pytree_node(
    _Saved, lambda s: ((s.buffers,), (s.treedef, s.where)), lambda aux, children: _Saved(children[0], *aux))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan_layers(layer: Layer, frozen_L, trained_L, x, consts, xs_L, buffers: tuple) -> tuple[jnp.ndarray, tuple]:
    """x through every layer (`frozen_L`, `trained_L` and `xs_L` stacked on a leading layers axis), and the
    buffers with this pass's residuals written in. Differentiable in `trained_L` and x only."""
    return _forward(layer, frozen_L, trained_L, x, consts, xs_L, buffers)[0]


def _forward(layer, frozen_L, trained_L, x, consts, xs_L, buffers):
    static = {}

    def body(carry, l):
        x, buffers = carry
        y, static["treedef"], static["where"], kept = _pullback(
            layer, _at(frozen_L, l), _at(trained_L, l), x, consts, _at(xs_L, l))
        return (y, tuple(jax.lax.dynamic_update_index_in_dim(b, r, l, 0) for b, r in zip(buffers, kept))), None

    (x, buffers), _ = jax.lax.scan(body, (x, tuple(buffers)), jnp.arange(_num_layers(frozen_L)))
    saved = _Saved(buffers, static["treedef"], static["where"])
    return (x, buffers), (saved, frozen_L, trained_L, consts, xs_L)


def _backward(layer, residuals, cotangents):
    saved, frozen_L, trained_L, consts, xs_L = residuals
    d_x, _ = cotangents  # the buffers are scratch: nothing flows back through them

    def body(carry, l):
        d_x, d_trained_L = carry
        inputs = jax.tree_util.tree_leaves((_at(frozen_L, l), _at(trained_L, l), consts, _at(xs_L, l)))
        kept = iter([b[l] for b in saved.buffers])
        leaves = [next(kept) if w is None else inputs[w] for w in saved.where]
        d_trained_l, d_x = jax.tree_util.tree_unflatten(saved.treedef, leaves)(d_x)
        d_trained_L = jax.tree.map(lambda g, d: jax.lax.dynamic_update_index_in_dim(g, d, l, 0), d_trained_L,
                                   d_trained_l)
        return (d_x, d_trained_L), None

    (d_x, d_trained_L), _ = jax.lax.scan(body, (d_x, jax.tree.map(jnp.zeros_like, trained_L)),
                                         jnp.arange(_num_layers(frozen_L)), reverse=True)
    return None, d_trained_L, d_x, None, None, None


scan_layers.defvjp(_forward, _backward)
