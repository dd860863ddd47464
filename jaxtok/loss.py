"""Next-token cross-entropy: the reference on logits, and the fused head + loss that training and evaluation use.

`next_token_loss` takes [B, T, V] logits. At Llama 3's vocabulary those logits are the largest buffers of a LoRA step
(B*T*128,256 floats, and as many again for their gradient), larger than the whole trainable state.

`fused_next_token_loss` never builds them. It takes the final hidden states and the `Head` (the frozen output matrix,
plus the token-row corrections of `jaxtok.tokens`), and walks the sequence in chunks of C positions: per chunk it
computes the [B, C, V] logits, their log-sum-exp and the target's logit, so one [B, C, V] buffer is live at a time.

Under differentiation the same pass also computes the gradients, from the chunk's logits while they are at hand
(a custom VJP): the loss is a scalar, so its gradients are these times the cotangent, and the backward pass only
scales them. Recomputing the logits in the backward instead would cost a third matmul with the V x D head, which is
most of the step where the vocabulary dominates:

    d logits = (softmax(logits) - onehot(target)) * weight
    d x      = d logits . W            d delta = d logits[:, ids]^T . x          d W = d logits^T . x

The gradient of W is written out like the others, so training the whole head (`lora+full`) works; when W is frozen
nothing consumes it and XLA drops that product (tests/test_memory.py checks the compiled step's buffers).
Evaluation (no differentiation) runs the loss alone, and can count from the same logits how many targets are the
argmax (`hit_mask_BT`: the accuracy on the new tokens).

Both functions return the sum of the token losses and the number of targets, not the mean, so callers add up
micro-batches and evaluation batches exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# Auto chunking: at most this many bytes of float32 logits per chunk. Accelerators get larger chunks, since their
# matmuls need many rows to run at speed and their memory is large; on CPU 32 MiB chunks already run at full speed.
LOGITS_CHUNK_BYTES = {"cpu": 32 * 2**20}
ACCELERATOR_LOGITS_CHUNK_BYTES = 256 * 2**20


class Head(NamedTuple):
    """The output layer: logits = x . W, except that the logits of tokens `ids` get x . delta[k] added.

    `weight` is the embedding [V, D] of a tied head (`layout` "vd") or the head [D, V] of an untied one ("dv").
    `delta_MD` is (trained row - frozen row) for each token row (None without rows): adding x . delta to the frozen
    logit gives exactly x . trained row, and a fresh table changes nothing bit for bit.
    """

    weight: jnp.ndarray
    layout: str
    ids: tuple[int, ...] = ()
    delta_MD: Optional[jnp.ndarray] = None

    def logits(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        """[B, T, V] logits in x's dtype (the un-fused path: generation, and the reference in tests)."""
        logits_BTV = jnp.einsum(f"btd,{self.layout}->btv", x_BTD, self.weight.astype(x_BTD.dtype))
        if not self.ids:
            return logits_BTV
        assert self.delta_MD is not None  # a head with token rows has their deltas
        rows_BTM = jnp.einsum("btd,md->btm", x_BTD, self.delta_MD.astype(x_BTD.dtype))
        return logits_BTV.at[..., jnp.asarray(self.ids)].add(rows_BTM)


def next_token_loss(logits_BTV: jnp.ndarray, tokens_BT: jnp.ndarray, target_mask_BT: jnp.ndarray):
    """Sum and count of the cross-entropy of predicting `tokens[:, t]` from position t-1, over t with a true mask.

    `target_mask[:, 0]` is ignored (nothing predicts the first token). Computed in float32 whatever the logits' dtype.
    """
    logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
    targets_BT = tokens_BT[:, 1:]
    weights_BT = target_mask_BT[:, 1:].astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z_BT - picked_BT) * weights_BT), jnp.sum(weights_BT)


def auto_chunk(batch: int, length: int, vocab: int, budget: Optional[int] = None) -> int:
    """The chunk length C: the whole sequence if its float32 logits fit `budget` (default: by backend), else the
    largest power of two whose [B, C, V] logits do (at least 1)."""
    if budget is None:
        budget = LOGITS_CHUNK_BYTES.get(jax.default_backend(), ACCELERATOR_LOGITS_CHUNK_BYTES)
    if batch * length * vocab * 4 <= budget:
        return length
    chunk = 1
    while 2 * chunk < length and batch * 2 * chunk * vocab * 4 <= budget:
        chunk *= 2
    return chunk


def fused_next_token_loss(head: Head, x_BTD: jnp.ndarray, tokens_BT: jnp.ndarray, target_mask_BT: jnp.ndarray,
                          chunk: int = 0, hit_mask_BT: Optional[jnp.ndarray] = None):
    """What `next_token_loss(head.logits(x), tokens, mask)` returns, computed C positions at a time.

    `chunk` is C; 0 chooses it with `auto_chunk`. The sequence is padded to a multiple of C with weightless positions.
    With `hit_mask_BT` (targets to score, like `target_mask_BT`), returns (sum, count, hits, scored): `hits` counts
    the scored targets that are their position's argmax. That path is for evaluation (it is not differentiated).
    """
    B, T, _ = x_BTD.shape
    V = head.weight.shape[0 if head.layout == "vd" else 1]
    C = chunk if chunk > 0 else auto_chunk(B, T, V)
    C = min(C, T)
    # Position t predicts token t+1; the last position predicts nothing (weight 0).
    targets_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))
    weights_BT = jnp.pad(target_mask_BT[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    pad = -T % C
    if pad:
        x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        weights_BT = jnp.pad(weights_BT, ((0, 0), (0, pad)))
    delta_MD = head.delta_MD if head.ids else jnp.zeros((0, x_BTD.shape[-1]), jnp.float32)
    if hit_mask_BT is None:
        total = _chunked_loss(head.layout, head.ids, C, x_BTD, head.weight, delta_MD, targets_BT, weights_BT)
        return total, jnp.sum(weights_BT)
    scored_BT = jnp.pad(hit_mask_BT[:, 1:].astype(jnp.float32), ((0, 0), (0, 1 + pad)))
    total, _, hits = _forward(head.layout, head.ids, C, x_BTD, head.weight, delta_MD, targets_BT, weights_BT, False,
                              scored_BT)
    return total, jnp.sum(weights_BT), hits, jnp.sum(scored_BT)


def _chunks(a, C):
    """[B, T, ...] -> [T/C, B, C, ...]: the scan runs over chunks of positions and keeps the batch axis (and so its
    sharding over devices) inside each chunk."""
    B, T = a.shape[:2]
    return jnp.moveaxis(a.reshape(B, T // C, C, *a.shape[2:]), 1, 0)


def _chunk_logits(layout, ids, x_BCD, weight, delta_MD):
    """[B, C, V] float32 logits of one chunk, accumulated in float32 whatever the compute dtype."""
    logits_BCV = jnp.einsum(f"bcd,{layout}->bcv", x_BCD, weight.astype(x_BCD.dtype),
                            preferred_element_type=jnp.float32)
    if ids:
        rows_BCM = jnp.einsum("bcd,md->bcm", x_BCD, delta_MD.astype(x_BCD.dtype), preferred_element_type=jnp.float32)
        logits_BCV = logits_BCV.at[..., jnp.asarray(ids)].add(rows_BCM)
    return logits_BCV


def _forward(layout, ids, C, x_BTD, weight, delta_MD, targets_BT, weights_BT, with_grads: bool, scored_BT=None):
    """(summed loss, its gradients for a cotangent of 1 or None, hits or None), from the same logits: the gradients
    with `with_grads`, and the number of targets marked in `scored_BT` that are their position's argmax."""
    dtype = x_BTD.dtype
    index = jnp.asarray(ids, jnp.int32)
    if scored_BT is None:
        scored_BT = jnp.zeros_like(weights_BT)

    def body(carry, xs):
        total, hits, d_weight, d_delta_MD = carry
        x_BCD, targets_BC, weights_BC, scored_BC = xs
        logits_BCV = _chunk_logits(layout, ids, x_BCD, weight, delta_MD)
        log_z_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
        total = total + jnp.sum((log_z_BC - picked_BC) * weights_BC)
        if not with_grads:
            hit_BC = jnp.argmax(logits_BCV, axis=-1) == targets_BC
            return (total, hits + jnp.sum(hit_BC * scored_BC), d_weight, d_delta_MD), None
        # softmax minus one-hot, weighted: the gradient of the chunk's loss with respect to its logits
        d_logits_BCV = jnp.exp(logits_BCV - log_z_BC[..., None]) * weights_BC[..., None]
        onehot_BCV = jax.nn.one_hot(targets_BC, logits_BCV.shape[-1], dtype=jnp.bool_)
        d_logits_BCV = jnp.where(onehot_BCV, d_logits_BCV - weights_BC[..., None], d_logits_BCV).astype(dtype)
        d_x_BCD = jnp.einsum(f"bcv,{layout}->bcd", d_logits_BCV, weight.astype(dtype),
                             preferred_element_type=jnp.float32)
        d_weight = d_weight + jnp.einsum(f"bcv,bcd->{layout}", d_logits_BCV, x_BCD,
                                         preferred_element_type=jnp.float32)
        if ids:
            d_rows_BCM = jnp.take(d_logits_BCV, index, axis=-1)
            d_x_BCD = d_x_BCD + jnp.einsum("bcm,md->bcd", d_rows_BCM, delta_MD.astype(dtype),
                                           preferred_element_type=jnp.float32)
            d_delta_MD = d_delta_MD + jnp.einsum("bcm,bcd->md", d_rows_BCM, x_BCD, preferred_element_type=jnp.float32)
        return (total, hits, d_weight, d_delta_MD), d_x_BCD

    shape = (weight.shape, delta_MD.shape) if with_grads else ((), ())
    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(shape[0], jnp.float32), jnp.zeros(shape[1], jnp.float32))
    xs = (_chunks(x_BTD, C), _chunks(targets_BT, C), _chunks(weights_BT, C), _chunks(scored_BT, C))
    (total, hits, d_weight, d_delta_MD), d_x_chunks = jax.lax.scan(body, init, xs)  # [T/C, B, C, D]
    if not with_grads:
        return total, None, hits
    B, T, D = x_BTD.shape
    d_x_BTD = jnp.moveaxis(d_x_chunks, 0, 1).reshape(B, T, D)
    return total, (d_x_BTD.astype(dtype), d_weight.astype(weight.dtype), d_delta_MD.astype(delta_MD.dtype)), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_loss(layout, ids, C, x_BTD, weight, delta_MD, targets_BT, weights_BT):
    return _forward(layout, ids, C, x_BTD, weight, delta_MD, targets_BT, weights_BT, with_grads=False)[0]


def _chunked_loss_fwd(layout, ids, C, x_BTD, weight, delta_MD, targets_BT, weights_BT):
    total, grads, _ = _forward(layout, ids, C, x_BTD, weight, delta_MD, targets_BT, weights_BT, with_grads=True)
    return total, grads


def _chunked_loss_bwd(layout, ids, C, grads, g):
    # The loss is a scalar, so its gradients are those computed in the forward pass times the cotangent.
    d_x_BTD, d_weight, d_delta_MD = grads
    return ((g * d_x_BTD).astype(d_x_BTD.dtype), (g * d_weight).astype(d_weight.dtype),
            (g * d_delta_MD).astype(d_delta_MD.dtype), None, None)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
