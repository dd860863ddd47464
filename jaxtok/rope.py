"""Rotary position embeddings in Hugging Face's half-split layout.

HF rotates the two halves of each head (`rotate_half`), not interleaved pairs as Meta's original code did; checkpoints
on the Hub have q/k weights permuted for that layout, so the layout must match HF's exactly.

Frequencies follow transformers' `modeling_rope_utils` for the types Llama checkpoints use. `dynamic` (NTK) depends on
the sequence length; HF reads it as `max(position_ids) + 1` of the current call, and so does this stateless version.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxtok.llama_config import LlamaConfig


def _base_inv_freq(theta, head_dim: int):
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))


def inverse_frequencies(config: LlamaConfig, seq_len=None) -> jnp.ndarray:
    """Returns the H/2 inverse frequencies (float32). `seq_len` (traced scalar) matters for `dynamic` only."""
    rope, H = config.rope, config.head_dim
    if rope.type == "dynamic":
        max_len = config.max_position_embeddings
        seq_len = max_len if seq_len is None else jnp.maximum(seq_len, max_len)
        base = rope.theta * ((rope.factor * seq_len / max_len) - (rope.factor - 1)) ** (H / (H - 2))
        exponents = jnp.arange(0, H, 2, dtype=jnp.float32) / H
        return (1.0 / (base ** exponents)).astype(jnp.float32)
    inv_freq = _base_inv_freq(rope.theta, H)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, rope)
    return jnp.asarray(inv_freq, jnp.float32)


def _llama3_scaling(inv_freq: np.ndarray, rope) -> np.ndarray:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: LlamaConfig, positions_BT: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of shape [B, T, H/2], computed in float32 and cast to the compute dtype as HF does."""
    seq_len = jnp.max(positions_BT) + 1 if config.rope.type == "dynamic" else None
    inv_freq = inverse_frequencies(config, seq_len)
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles_BTh).astype(dtype), jnp.sin(angles_BTh).astype(dtype)


def apply_rope(x_BTNH: jnp.ndarray, cos_BTh: jnp.ndarray, sin_BTh: jnp.ndarray) -> jnp.ndarray:
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
