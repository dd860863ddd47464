"""Next-token cross-entropy: the reference on logits, and the fused head + loss that training and evaluation use.

`next_token_loss` takes [B, T, V] logits. At Llama 3's vocabulary those logits are the largest buffers of a LoRA step
(B*T*128,256 floats, and as many again for their gradient), larger than the whole trainable state.

`fused_next_token_loss` never builds them. It takes the final hidden states and the `Head` (the output matrix, plus
the token-row corrections of `jaxtok.tokens`) and returns the loss; under differentiation it computes the gradients in
the same pass (a custom VJP: the loss is a scalar, so its gradients are these times the cotangent, and the backward
pass only scales them). Recomputing the logits in the backward instead would cost a third matmul with the V x D head,
which is most of the step where the vocabulary dominates. It takes one of two routes:

* **Vocabulary blocks** (training with a frozen head: `lora`, `lora+rows`, `rows`). One pass over the head in blocks
  of U rows, for all B*T positions at once, with an online log-sum-exp (as flash attention does over keys): per
  block, the [B, T, U] logits, then the running max, the running sum of exponentials and the running sum of
  exponential-weighted head rows are rescaled and updated. At the end

      log Z = max + log(sum)        d x = weight * (rows sum / sum - row of the target)

  and the loss is log Z minus the target's logit. The trained token rows are one more block, taken first (their
  columns of the frozen head are masked out), so `d delta` comes from their softmax share.
  Why: profiled at shape S of `scripts/benchmark.py` (vocabulary 128,256, hidden 256, 1,024 positions, 2-core CPU),
  the route below spent about 1 s of a 1.3 s step in its two head matmuls, at about 130 GFLOP/s against the ~190 the
  machine reaches: each chunk of 64 positions re-reads and re-packs the whole 131 MB head. Here each block of the
  head (U x D, a few MB) is read once and used by both of its matmuls while it is in cache, and both have B*T rows.
  The loss's value and gradient at shape S went from about 1.2 s to about 0.75 s, at Llama-3.2-1B's shape from about
  4.0 s to 2.8 s (measured alone, jitted, median of 5).
* **Position chunks** (evaluation, and training the whole head: `lora+full`). The sequence is walked in chunks of C
  positions: per chunk the [B, C, V] logits, their log-sum-exp and the target's logit, so one [B, C, V] buffer is
  live at a time; with gradients, from those same logits:

      d logits = (softmax(logits) - onehot(target)) * weight
      d x      = d logits . W            d delta = d logits[:, ids]^T . x          d W = d logits^T . x

  The head's own gradient needs the whole softmax of every position before any of its rows is done, which the
  vocabulary route does not have; so that route is taken only when the head is not differentiated (JAX's symbolic
  zeros tell the custom VJP which inputs are). Evaluation can count from the chunk's logits how many targets are the
  argmax (`hit_mask_BT`: the accuracy on the new tokens).

Both functions return the sum of the token losses and the number of targets, not the mean, so callers add up
micro-batches and evaluation batches exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# Auto sizes: at most this many bytes of float32 logits per position chunk or vocabulary block. Accelerators get
# larger ones, since their matmuls need many rows to run at speed and their memory is large. On CPU a vocabulary block
# should stay in cache while both its matmuls read it (at shape S, 512- to 2,048-row blocks ran within 10% of each
# other; the whole head, 131 MB, does not fit).
LOGITS_CHUNK_BYTES = {"cpu": 32 * 2**20}
VOCAB_BLOCK_BYTES = {"cpu": 4 * 2**20}
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


def head_rows(weight: jnp.ndarray, layout: str, index: jnp.ndarray) -> jnp.ndarray:
    """The head's rows for the token ids `index` (any shape), [..., D], whichever the head's layout."""
    if layout == "vd":
        return jnp.take(weight, index, axis=0)
    return jnp.moveaxis(jnp.take(weight, index, axis=1), 0, -1)


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



def auto_vocab_block(positions: int, vocab: int, budget: Optional[int] = None) -> int:
    """The vocabulary block U: the whole vocabulary if `positions` float32 logits per row fit `budget` (default: by
    backend), else the largest power of two whose [positions, U] logits do (at least 128)."""
    if budget is None:
        budget = VOCAB_BLOCK_BYTES.get(jax.default_backend(), ACCELERATOR_LOGITS_CHUNK_BYTES)
    if positions * vocab * 4 <= budget:
        return vocab
    block = 128
    while 2 * block < vocab and positions * 2 * block * 4 <= budget:
        block *= 2
    return block


def fused_next_token_loss(head: Head, x_BTD: jnp.ndarray, tokens_BT: jnp.ndarray, target_mask_BT: jnp.ndarray,
                          chunk: int = 0, hit_mask_BT: Optional[jnp.ndarray] = None, vocab_block: int = 0):
    """What `next_token_loss(head.logits(x), tokens, mask)` returns, without [B, T, V] logits.

    `chunk` is C, the positions per chunk of the position route; `vocab_block` is U, the head rows per block of the
    vocabulary route (module docstring); 0 chooses each with `auto_chunk` / `auto_vocab_block`.
    With `hit_mask_BT` (targets to score, like `target_mask_BT`), returns (sum, count, hits, scored): `hits` counts
    the scored targets that are their position's argmax. That path is for evaluation (it is not differentiated).
    """
    B, T, _ = x_BTD.shape
    V = head.weight.shape[0 if head.layout == "vd" else 1]
    C = min(chunk if chunk > 0 else auto_chunk(B, T, V), T)
    U = min(vocab_block if vocab_block > 0 else auto_vocab_block(B * T, V), V)
    # Position t predicts token t+1; the last position predicts nothing (weight 0).
    targets_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))
    weights_BT = jnp.pad(target_mask_BT[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    delta_MD = head.delta_MD if head.ids else jnp.zeros((0, x_BTD.shape[-1]), jnp.float32)
    if hit_mask_BT is None:
        total = _fused_loss(head.layout, head.ids, C, U, x_BTD, head.weight, delta_MD, targets_BT, weights_BT)
        return total, jnp.sum(weights_BT)
    scored_BT = jnp.pad(hit_mask_BT[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    total, _, hits = _by_positions(head.layout, head.ids, C, x_BTD, head.weight, delta_MD, targets_BT, weights_BT,
                                   False, scored_BT)
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


def _by_positions(layout, ids, C, x_BTD, weight, delta_MD, targets_BT, weights_BT, with_grads: bool,
                  scored_BT=None):
    """The position route: (summed loss, its gradients for a cotangent of 1 or None, hits or None), from the same
    logits: the gradients with `with_grads`, and the number of targets marked in `scored_BT` that are their
    position's argmax. The sequence is padded to a multiple of C with weightless positions."""
    dtype = x_BTD.dtype
    index = jnp.asarray(ids, jnp.int32)
    B, T, D = x_BTD.shape
    if scored_BT is None:
        scored_BT = jnp.zeros_like(weights_BT)
    pad = ((0, 0), (0, -T % C))
    x_BTD = jnp.pad(x_BTD, pad + ((0, 0),))
    targets_BT, weights_BT, scored_BT = (jnp.pad(a, pad) for a in (targets_BT, weights_BT, scored_BT))

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
    d_x_BTD = jnp.moveaxis(d_x_chunks, 0, 1).reshape(x_BTD.shape)[:, :T]
    return total, (d_x_BTD.astype(dtype), d_weight.astype(weight.dtype), d_delta_MD.astype(delta_MD.dtype)), None


def _by_vocabulary(layout, ids, U, x_BTD, weight, delta_MD, targets_BT, weights_BT):
    """The vocabulary route, for a head that is not differentiated: (summed loss, (d x, d delta)) for a cotangent of
    1. Blocks of U head rows are read with a dynamic slice (no copy of the head), the last partial block after."""
    dtype = x_BTD.dtype
    axis = 0 if layout == "vd" else 1
    V = weight.shape[axis]
    block_layout = layout.replace("v", "u")  # a block of the head: [U, D] or [D, U]

    def update(carry, logits_BTU, rows, masked_U=None):
        """Folds one block's logits and its head rows (laid out as the head is) into the running max, sum and rows;
        columns in `masked_U` count as -inf.

        The running max is only the shift that keeps exp in range, and any shift at least the max gives the same
        result, so it includes the masked columns (the frozen rows of the trained tokens): masking before the max
        would make XLA write a masked copy of the block, 4 MB at the default block size.
        """
        max_BT, sum_BT, rows_BTD = carry
        new_max_BT = jnp.maximum(max_BT, jnp.max(logits_BTU, axis=-1))
        scale_BT = jnp.exp(max_BT - new_max_BT)
        if masked_U is not None:
            logits_BTU = jnp.where(masked_U, -jnp.inf, logits_BTU)
        p_BTU = jnp.exp(logits_BTU - new_max_BT[..., None])
        rows_BTD = rows_BTD * scale_BT[..., None] + jnp.einsum(f"btu,{block_layout}->btd", p_BTU.astype(dtype), rows,
                                                               preferred_element_type=jnp.float32)
        return new_max_BT, sum_BT * scale_BT + jnp.sum(p_BTU, axis=-1), rows_BTD

    B, T, D = x_BTD.shape
    carry = (jnp.full((B, T), -jnp.inf, jnp.float32), jnp.zeros((B, T), jnp.float32),
             jnp.zeros((B, T, D), jnp.float32))
    if ids:  # the trained rows are a block of their own, taken first (so the running max is finite before any block
        # with masked columns); their columns of the frozen head are masked out
        index = jnp.asarray(ids, jnp.int32)
        trained_MD = (head_rows(weight, layout, index) + delta_MD.astype(weight.dtype)).astype(dtype)
        rows_logits_BTM = jnp.einsum("btd,md->btm", x_BTD, trained_MD, preferred_element_type=jnp.float32)
        carry = update(carry, rows_logits_BTM, trained_MD if layout == "vd" else trained_MD.T)

    def block(carry, start, size):
        rows = jax.lax.dynamic_slice_in_dim(weight, start, size, axis).astype(dtype)
        logits_BTU = jnp.einsum(f"btd,{block_layout}->btu", x_BTD, rows, preferred_element_type=jnp.float32)
        # (a [V] mask would be the one vocabulary-sized buffer; M compares per column are cheap)
        masked_U = jnp.any((start + jnp.arange(size))[:, None] == index, axis=-1) if ids else None
        return update(carry, logits_BTU, rows, masked_U)

    carry = jax.lax.fori_loop(0, V // U, lambda i, carry: block(carry, i * U, U), carry)
    if V % U:
        carry = block(carry, V - V % U, V % U)
    max_BT, sum_BT, rows_BTD = carry
    log_z_BT = max_BT + jnp.log(sum_BT)

    # the target's head row (its trained row for a token row) and logit
    target_BTD = head_rows(weight, layout, targets_BT).astype(jnp.float32)
    if ids:
        is_row_BTM = (targets_BT[..., None] == index).astype(jnp.float32)
        target_BTD = target_BTD + jnp.einsum("btm,md->btd", is_row_BTM, delta_MD.astype(jnp.float32))
    picked_BT = jnp.sum(x_BTD.astype(jnp.float32) * target_BTD, axis=-1)
    total = jnp.sum((log_z_BT - picked_BT) * weights_BT)
    d_x_BTD = (rows_BTD / sum_BT[..., None] - target_BTD) * weights_BT[..., None]
    if not ids:
        return total, (d_x_BTD.astype(dtype), jnp.zeros_like(delta_MD))
    d_rows_BTM = (jnp.exp(rows_logits_BTM - log_z_BT[..., None]) - is_row_BTM) * weights_BT[..., None]
    d_delta_MD = jnp.einsum("btm,btd->md", d_rows_BTM.astype(dtype), x_BTD, preferred_element_type=jnp.float32)
    return total, (d_x_BTD.astype(dtype), d_delta_MD.astype(delta_MD.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused_loss(layout, ids, C, U, x_BTD, weight, delta_MD, targets_BT, weights_BT):
    return _by_positions(layout, ids, C, x_BTD, weight, delta_MD, targets_BT, weights_BT, with_grads=False)[0]


def _fused_loss_fwd(layout, ids, C, U, x_BTD, weight, delta_MD, targets_BT, weights_BT):
    # symbolic zeros: each array argument comes as (value, perturbed); a head that is not perturbed (frozen) takes
    # the vocabulary route
    args = [a.value for a in (x_BTD, weight, delta_MD, targets_BT, weights_BT)]
    if weight.perturbed:
        total, grads, _ = _by_positions(layout, ids, C, *args, with_grads=True)
        return total, grads
    total, (d_x_BTD, d_delta_MD) = _by_vocabulary(layout, ids, U, *args)
    return total, (d_x_BTD, None, d_delta_MD)


def _fused_loss_bwd(layout, ids, C, U, grads, g):
    # The loss is a scalar, so its gradients are those computed in the forward pass times the cotangent.
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return (None,) * 5
    return tuple(None if d is None else (g * d).astype(d.dtype) for d in grads) + (None, None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd, symbolic_zeros=True)
