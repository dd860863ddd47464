"""One compiled training step over the trainable pytrees only.

A batch holds `tokens`, `positions`, `segment_ids` (0 = padding) and `loss_mask` (1 where the token is a target),
each [A, B, T] with A micro-batches. The step scans the micro-batches, summing token losses and gradients in
buffers shaped like the trainable tree (never like the frozen base), then divides by the number of target tokens:
the update is that of the token-weighted mean loss over the whole batch, whatever A is.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxtok import trainable as trainable_lib
from jaxtok.model import Llama

Batch = dict[str, jnp.ndarray]


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    trainable: Any  # {"lora": ..., "tokens": ..., maybe "params": {"embed": ...}}
    opt_state: Any
    rng: jax.Array
    # None, or the `residuals` collection of `residual_buffers`: memory the step's backward reuses (never saved)
    residuals: Any = None


def init_state(trainable: dict, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), jax.random.key(seed))


def residual_buffers(model: Llama, trainable: dict, frozen: dict, batch: dict[str, Any]) -> dict:
    """Zeroed buffers for `TrainState.residuals`, sized for batches shaped like `batch` ([A, B, T] arrays, or their
    ShapeDtypeStructs). With them the step keeps its layers' residuals there, in memory every step reuses, rather
    than in scratch memory mapped afresh each step (`jaxtok.layer_stack` says why and what it saves)."""

    def residuals(trainable, frozen, micro):
        variables = trainable_lib.merge(frozen, trainable)
        return _train_loss(model, variables, micro, jax.random.key(0), mutable=["residuals"])[1]["residuals"]

    micro = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), batch)
    shapes = jax.eval_shape(residuals, trainable, frozen, micro)
    return jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes))()  # one compilation


def _train_loss(model: Llama, variables: dict, micro: Batch, rng: jax.Array, **kw):
    """The model's (sum, count) of the training loss on one micro-batch (with the mutated collections when `kw`
    has `mutable`)."""
    return model.apply(variables, micro["tokens"], micro["positions"], micro["segment_ids"], train=True,
                       rngs={"dropout": rng}, loss_mask_BT=micro["loss_mask"], **kw)


def state_shardings(optimizer: optax.GradientTransformation, trainable, trainable_shardings, mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments are placed like the parameter they belong to, the rest replicated.

    A moment is matched to its parameter by path (optax states nest the parameter tree), never by shape: two
    parameters of one shape can be sharded differently.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {_names(path): sh for path, sh in jax.tree_util.tree_flatten_with_path(trainable_shardings)[0]}

    def place(path, leaf):
        names = _names(path)
        for start in range(len(names)):
            if names[start:] in by_path and getattr(leaf, "ndim", 0) > 0:
                return by_path[names[start:]]
        return replicated

    abstract_opt = jax.eval_shape(optimizer.init, trainable)
    opt = jax.tree_util.tree_map_with_path(place, abstract_opt)
    # a TrainState of shardings, as jax.jit's in_shardings take one: the state's tree with NamedSharding leaves
    return TrainState(replicated, trainable_shardings, opt, replicated)  # type: ignore[arg-type]


def _names(path) -> tuple[str, ...]:
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def make_train_step(
    model: Llama, optimizer: optax.GradientTransformation, lr_schedule: Callable, donate: bool = True,
    shardings: Optional[tuple] = None,
) -> Callable[[TrainState, dict, Batch], tuple[TrainState, dict]]:
    """`step(state, frozen, batch) -> (state, metrics)`, jit-compiled, donating the state.

    `shardings` = (state, frozen, batch) shardings pins the step's inputs and outputs to a mesh; metrics come back
    replicated.
    """

    def loss_sum(trainable, frozen, micro, rng, residuals):
        variables = trainable_lib.merge(frozen, trainable)
        if residuals is None:
            (total, count), _ = _train_loss(model, variables, micro, rng)
            return total, (count, None)
        ((total, count), _), written = _train_loss(model, {**variables, "residuals": residuals}, micro, rng,
                                                   mutable=["residuals"])
        return total, (count, written["residuals"])

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)  # aux: the number of target tokens, the residual buffers

    def step(state: TrainState, frozen: dict, batch: Batch):
        chex.assert_rank(batch["tokens"], 3)  # [A, B, T]: micro-batches first, even for one
        chex.assert_equal_shape(list(batch.values()))
        rng, step_rng = jax.random.split(state.rng)
        num_micro = batch["tokens"].shape[0]

        def accumulate(carry, xs):
            grads, total, count, residuals = carry
            micro, micro_rng = xs
            (s, (n, residuals)), g = grad_fn(state.trainable, frozen, micro, micro_rng, residuals)
            return (jax.tree.map(jnp.add, grads, g), total + s, count + n, residuals), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), state.residuals)
        (grads, total, count, residuals), _ = jax.lax.scan(accumulate, init,
                                                           (batch, jax.random.split(step_rng, num_micro)))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new = TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state, rng, residuals)
        metrics = {
            "loss": total / count,
            "grad_norm": optax.tree_utils.tree_norm(grads),
            "lr": lr_schedule(state.step),
            "tokens": count,  # target tokens
            "input_tokens": jnp.sum(batch["segment_ids"] != 0),  # non-padding tokens read
        }
        return new, metrics

    jit_kw: dict[str, Any] = {}
    if shardings is not None:
        state_sh, frozen_sh, batch_sh = shardings
        metrics_sh = NamedSharding(batch_sh.mesh, PartitionSpec())
        jit_kw = dict(in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, metrics_sh))
    return jax.jit(step, donate_argnums=(0,) if donate else (), **jit_kw)

