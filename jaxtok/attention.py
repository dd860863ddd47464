"""Causal softmax attention over a whole sequence (no KV cache), in query blocks, with a backward written out.

This computes what `jax.nn.dot_product_attention` computes under a mask that includes the causal one, in float32
scores; `jaxtok.model` uses it whenever there is no cache and no `model.attention` kernel is asked for.

Why it is written out. Attention is about 5% of a body-heavy step's FLOPs, but on CPU its time goes to reading and
writing its scores. Profiled at shape M of `scripts/benchmark.py` (8 layers, 2 x 512 positions, 16/4 heads; JAX
profiler, per-op times mapped to HLO), autodiff over JAX's attention spent most of attention's time in elementwise
passes over [B, N, T, S] scores and in transposed copies of them. So:

* Queries go in blocks of C = 64 positions, and each block reads only the keys up to its last query (the others are
  masked anyway): 9/16 of the scores at 512 positions. Blocks of 32 or 128 were slower.
* Heads are laid out [B, K, J, T, H], so every matmul batches over (B, K).
* The forward normalises the [C, H] output rather than the [C, S] probabilities and keeps only each query's
  log-sum-exp; the backward recomputes the probabilities from it, in the pass that masks them and forms the score
  gradient, instead of keeping every block's probabilities.
* The key and value gradients come out [B, K, S, H], with S a major axis, so each block's part is padded along a
  major axis and the final transpose to [B, S, K, H] moves whole H rows. Getting them as [B, K, H, S] instead (so
  the matmuls read the scores untransposed) made XLA fuse the sum of the blocks' parts with the transpose and the
  RoPE backward into one strided loop, which cost more than it saved.

Measured on the 2-core CPU, median of 7, gradient of 8 layers under a scan: attention alone, autodiff over query
blocks of 128 74 ms per layer, this 60 ms, in one run (JAX's own attention: 114 ms in an earlier one); with the
q/k/v/o projections and RoPE (forward and backward of x and weights), autodiff over query blocks of 128 took
1,436-1,489 ms for the 8 layers, this 1,263-1,293 ms.

A query that sees no key (padding) gets the mean of the values its block reads (JAX's: of all values), and passes no
gradient back through its scores, as with JAX's; no output reads it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

# Queries per block.
ATTENTION_BLOCK = 64

_MASKED = jnp.finfo(jnp.float32).min


def causal_attention(q_BTNH: jnp.ndarray, k_BTKH: jnp.ndarray, v_BTKH: jnp.ndarray, mask_BTS: jnp.ndarray,
                     block: int = ATTENTION_BLOCK) -> jnp.ndarray:
    """[B, T, N, H] attention output of queries q over keys k and values v (K <= N heads, grouped), where
    `mask_BTS` (boolean, including the causal mask) says which keys each query sees."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    scale = jnp.asarray(H**-0.5, q_BTNH.dtype)
    q_BKJTH = jnp.transpose(q_BTNH.reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4)) * scale
    out_BKJTH = _attention(q_BKJTH, jnp.transpose(k_BTKH, (0, 2, 3, 1)), jnp.transpose(v_BTKH, (0, 2, 3, 1)),
                           mask_BTS, block)
    return jnp.transpose(out_BKJTH, (0, 3, 1, 2, 4)).reshape(B, T, N, H)


def _blocks(T: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, T)) for start in range(0, T, block)]


def _scores(q_BKJCH, k_BKHS, mask_B11CS, end: int):
    """One query block's masked float32 scores [B, K, J, C, S] over the keys up to its last query, `end` (q is
    scaled); `mask_B11CS` is the block's part of the mask."""
    scores_BKJCS = jnp.einsum("bkjch,bkhs->bkjcs", q_BKJCH, k_BKHS[..., :end], preferred_element_type=jnp.float32)
    return jnp.where(mask_B11CS, scores_BKJCS, _MASKED)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BKJTH, k_BKHS, v_BKHS, mask_BTS, block):
    return _attention_fwd(q_BKJTH, k_BKHS, v_BKHS, mask_BTS, block)[0]


def _attention_fwd(q_BKJTH, k_BKHS, v_BKHS, mask_BTS, block):
    out, lse = [], []
    for start, end in _blocks(q_BKJTH.shape[3], block):
        scores_BKJCS = _scores(q_BKJTH[:, :, :, start:end], k_BKHS, mask_BTS[:, None, None, start:end, :end], end)
        max_BKJC1 = jnp.max(scores_BKJCS, axis=-1, keepdims=True)
        exp_BKJCS = jnp.exp(scores_BKJCS - max_BKJC1)
        sum_BKJC1 = jnp.sum(exp_BKJCS, axis=-1, keepdims=True)
        out_BKJCH = jnp.einsum("bkjcs,bkhs->bkjch", exp_BKJCS.astype(q_BKJTH.dtype), v_BKHS[..., :end],
                               preferred_element_type=jnp.float32)
        out.append((out_BKJCH / sum_BKJC1).astype(q_BKJTH.dtype))
        lse.append((max_BKJC1 + jnp.log(sum_BKJC1))[..., 0])
    out_BKJTH = jnp.concatenate(out, axis=3)
    return out_BKJTH, (q_BKJTH, k_BKHS, v_BKHS, mask_BTS, out_BKJTH, jnp.concatenate(lse, axis=3))


def _attention_bwd(block, residuals, d_out_BKJTH):
    q_BKJTH, k_BKHS, v_BKHS, mask_BTS, out_BKJTH, lse_BKJT = residuals
    dtype, S = q_BKJTH.dtype, k_BKHS.shape[-1]
    # softmax's backward: d s = p (d p - sum_s p d p), and sum_s p d p = sum_h out d out
    delta_BKJT = jnp.sum(out_BKJTH.astype(jnp.float32) * d_out_BKJTH.astype(jnp.float32), axis=-1)
    d_q, d_k_BKSH, d_v_BKSH = [], 0.0, 0.0
    for start, end in _blocks(q_BKJTH.shape[3], block):
        q_BKJCH, d_out_BKJCH = q_BKJTH[:, :, :, start:end], d_out_BKJTH[:, :, :, start:end]
        mask_B11CS = mask_BTS[:, None, None, start:end, :end]
        probs_BKJCS = jnp.exp(_scores(q_BKJCH, k_BKHS, mask_B11CS, end) - lse_BKJT[..., start:end, None])
        d_probs_BKJCS = jnp.einsum("bkjch,bkhs->bkjcs", d_out_BKJCH, v_BKHS[..., :end],
                                   preferred_element_type=jnp.float32)
        d_scores_BKJCS = probs_BKJCS * (d_probs_BKJCS - delta_BKJT[..., start:end, None])
        d_scores_BKJCS = jnp.where(mask_B11CS, d_scores_BKJCS, 0.0).astype(dtype)
        d_q.append(jnp.einsum("bkjcs,bkhs->bkjch", d_scores_BKJCS, k_BKHS[..., :end]))
        pad = [(0, 0), (0, 0), (0, S - end), (0, 0)]
        d_k_BKSH = d_k_BKSH + jnp.pad(jnp.einsum("bkjcs,bkjch->bksh", d_scores_BKJCS, q_BKJCH), pad)
        d_v_BKSH = d_v_BKSH + jnp.pad(jnp.einsum("bkjcs,bkjch->bksh", probs_BKJCS.astype(dtype), d_out_BKJCH), pad)
    return jnp.concatenate(d_q, axis=3), jnp.swapaxes(d_k_BKSH, 2, 3), jnp.swapaxes(d_v_BKSH, 2, 3), None


_attention.defvjp(_attention_fwd, _attention_bwd)
