"""jaxtok.attention against JAX's own attention: values and gradients, float32 to 1e-5."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtok.attention import causal_attention
from jaxtok.model import attention_mask

B, T, N, K, H = 2, 16, 4, 2, 8
SEGMENTS = [[1] * 6 + [2] * 7 + [0] * 3, [0] * 4 + [1] * 12]  # packed documents, right and left padding


def _inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), dtype) for n in (N, K, K))
    segments = jnp.asarray(SEGMENTS)
    seen = np.asarray(segments != 0)[:, :, None, None]
    w = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype) * seen  # a padding query's output is never read
    return q, k, v, attention_mask(segments, segments), seen, w


@pytest.mark.parametrize("block", [1, 5, 16, 64])
def test_causal_attention_in_query_blocks_equals_jax_attention(block):
    """Blocks that do and do not divide the 16 positions: every query that sees a key gets JAX's output, and the
    gradients of q, k and v are JAX's."""
    q, k, v, mask, seen, w = _inputs()

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v) * w)

    ours = lambda q, k, v: causal_attention(q, k, v, mask, block)  # noqa: E731
    theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])  # noqa: E731
    np.testing.assert_allclose(np.asarray(ours(q, k, v)) * seen, np.asarray(theirs(q, k, v)) * seen, rtol=1e-5,
                               atol=1e-6)
    chex.assert_trees_all_close(jax.grad(loss, (1, 2, 3))(ours, q, k, v), jax.grad(loss, (1, 2, 3))(theirs, q, k, v),
                                rtol=1e-5, atol=1e-6)


def test_causal_attention_keeps_bfloat16():
    """In bfloat16 the output and the gradients stay bfloat16 (scores are float32) and stay close to float32's."""
    q, k, v, mask, seen, w = _inputs(jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum((causal_attention(q, k, v, mask, 5) * w).astype(jnp.float32))

    out, grads = causal_attention(q, k, v, mask, 5), jax.grad(loss, (0, 1, 2))(q, k, v)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(out, np.float32) * seen,
                               np.asarray(causal_attention(*f32, mask, 5)) * seen, atol=0.05)
