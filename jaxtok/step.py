"""One compiled training step over the trainable pytrees only.

A batch holds `tokens`, `positions`, `segment_ids` (0 = padding) and `loss_mask` (1 where the token is a target),
each [A, B, T] with A micro-batches. The step scans the micro-batches, summing token losses and gradients in
buffers shaped like the trainable tree (never like the frozen base), then divides by the number of target tokens:
the update is that of the token-weighted mean loss over the whole batch, whatever A is.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxtok import trainable as trainable_lib
from jaxtok.loss import next_token_loss
from jaxtok.model import Llama

Batch = dict[str, jnp.ndarray]


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    trainable: Any  # {"lora": ..., "tokens": ..., maybe "params": {"embed": ...}}
    opt_state: Any
    rng: jax.Array


def init_state(trainable: dict, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), jax.random.key(seed))


def make_train_step(
    model: Llama, optimizer: optax.GradientTransformation, lr_schedule: Callable, donate: bool = True
) -> Callable[[TrainState, dict, Batch], tuple[TrainState, dict]]:
    """`step(state, frozen, batch) -> (state, metrics)`, jit-compiled, donating the state."""

    def loss_sum(trainable, frozen, micro, rng):
        logits_BTV, _ = model.apply(
            trainable_lib.merge(frozen, trainable), micro["tokens"], micro["positions"], micro["segment_ids"],
            train=True, rngs={"dropout": rng},
        )
        return next_token_loss(logits_BTV, micro["tokens"], micro["loss_mask"])

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)  # aux: the number of target tokens

    def step(state: TrainState, frozen: dict, batch: Batch):
        rng, step_rng = jax.random.split(state.rng)
        num_micro = batch["tokens"].shape[0]

        def accumulate(carry, xs):
            grads, total, count = carry
            micro, micro_rng = xs
            (s, n), g = grad_fn(state.trainable, frozen, micro, micro_rng)
            return (jax.tree.map(jnp.add, grads, g), total + s, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, total, count), _ = jax.lax.scan(accumulate, init, (batch, jax.random.split(step_rng, num_micro)))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new = TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state, rng)
        metrics = {
            "loss": total / count,
            "grad_norm": optax.tree_utils.tree_norm(grads),
            "lr": lr_schedule(state.step),
            "tokens": count,  # target tokens
            "input_tokens": jnp.sum(batch["segment_ids"] != 0),  # non-padding tokens read
        }
        return new, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())

