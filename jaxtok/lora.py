"""LoRA: low-rank adapters on the frozen linear maps, laid out and scaled exactly as PEFT does.

For a targeted projection with frozen kernel W (in -> out):

    y = x W + scaling * dropout(x) A^T B^T,    A: [R, I],  B: [O, R]

with I and O the flattened input and output features (for q_proj, O = N*H), so A and B are PEFT's `lora_A.weight` and
`lora_B.weight` as they are and export is a renaming. scaling = alpha / R, or alpha / sqrt(R) with rsLoRA. A starts
uniform in +-1/sqrt(I) (PEFT's kaiming-uniform with a=sqrt(5)) and B at zero, so a fresh adapter changes nothing.

The parameters live in the `lora` collection, stacked over layers like the base:

    params/layers/attn/q_proj/kernel   [L, D, N, H]   frozen
    lora/layers/attn/q_proj/a          [L, R, D]      float32, trained
    lora/layers/attn/q_proj/b          [L, N*H, R]    float32, trained

Shapes follow the legend of `jaxtok.shapes`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtok.errors import JaxtokError
from jaxtok.llama_config import PROJECTIONS

TARGETS = PROJECTIONS["attn"] + PROJECTIONS["mlp"]  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default for Llama, and for Mistral, Qwen2 and Qwen3 alike


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise JaxtokError(f"LoRA rank must be a positive integer (got {self.rank!r})")
        if not 0.0 <= self.dropout < 1.0:
            raise JaxtokError(f"LoRA dropout must be in [0, 1) (got {self.dropout!r})")
        if not math.isfinite(self.alpha):
            raise JaxtokError(f"LoRA alpha must be finite (got {self.alpha!r})")
        object.__setattr__(self, "targets", expand_targets(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def expand_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Validates target module names; "all-linear" means every linear map but the output head, as in PEFT."""
    if isinstance(targets, str):
        targets = (targets,)
    if tuple(targets) == ("all-linear",):
        return TARGETS
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise JaxtokError(
            f"unknown LoRA target {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(TARGETS)} or 'all-linear'"
        )
    return tuple(t for t in TARGETS if t in targets)  # canonical order, duplicates dropped


def _uniform_fan_in(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_delta(module: nn.Module, x_BTI, config: LoraConfig, out_features: int, axes: tuple[str, str], train: bool,
               dtype):
    """scaling * dropout(x) A^T B^T for x [B, T, I] -> [B, T, O], declaring `a` and `b` on `module`.

    `axes` are the logical names of the in and out features. The init functions run only when the variables are
    missing (init, or apply with `lora` mutable).
    """
    R, I = config.rank, x_BTI.shape[-1]
    a_RI = module.variable(
        "lora", "a", nn.with_logical_partitioning(lambda: _uniform_fan_in(module.make_rng("params"), (R, I)),
                                                  ("lora_rank", axes[0]))
    ).value
    b_OR = module.variable(
        "lora", "b", nn.with_logical_partitioning(lambda: jnp.zeros((out_features, R), jnp.float32),
                                                  (axes[1], "lora_rank"))
    ).value
    if train and config.dropout > 0.0:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout, x_BTI.shape)
        x_BTI = jnp.where(keep, x_BTI / (1.0 - config.dropout), 0.0).astype(x_BTI.dtype)
    # flax types `.value` as the LogicallyPartitioned box that the init returns; it gives the unboxed array
    return _low_rank(x_BTI, a_RI.astype(dtype), b_OR.astype(dtype),  # type: ignore[attr-defined]
                     jnp.asarray(config.scaling, dtype))


# The backward is written out rather than left to autodiff, for speed. Profiling the train step of a 1024-hidden,
# 8-layer model on CPU (JAX profiler, per-HLO-op times) showed autodiff's gradient of B, einsum("bto,btr->or"),
# compiled into a transpose of the [B*T, O] output gradient, fused with the MLP's elementwise backward and read
# column-wise: two such fusions per layer took a fifth of the step. Asking for the gradient as [R, O] (its
# natural shape, only the small [B*T, R] operand is transposed) and transposing that [R, O] result removes them.
# The optimization barrier keeps it so: without it XLA folds the transpose back into the matmul, which then
# yields [O, R] from two operands contracted over their major axis. The CPU backend's fast matmul library
# (YNNPACK) does not take that form, and its fallback ran at ~10 GFLOP/s: 14 ms for each of gate_proj and
# up_proj per layer at shape M of `scripts/benchmark.py` (JAX profiler), about 3% of the step in all.
# The scaling multiplies the [B, T, R] activations and their gradient, not the [B, T, O] output and its gradient:
# those two full-width multiplies per projection were about 10 ms per layer of that step.
@jax.custom_vjp
def _low_rank(x_BTI, a_RI, b_OR, scaling):
    return _low_rank_fwd(x_BTI, a_RI, b_OR, scaling)[0]


def _low_rank_fwd(x_BTI, a_RI, b_OR, scaling):
    h_BTR = jnp.einsum("bti,ri->btr", x_BTI, a_RI) * scaling
    return jnp.einsum("btr,or->bto", h_BTR, b_OR), (x_BTI, a_RI, b_OR, scaling, h_BTR)


def _low_rank_bwd(residuals, d_y_BTO):
    x_BTI, a_RI, b_OR, scaling, h_BTR = residuals  # h is scaled
    d_b_OR = jax.lax.optimization_barrier(jnp.einsum("btr,bto->ro", h_BTR, d_y_BTO)).T
    d_h_BTR = jnp.einsum("bto,or->btr", d_y_BTO, b_OR) * scaling
    d_a_RI = jnp.einsum("btr,bti->ri", d_h_BTR, x_BTI)
    d_x_BTI = jnp.einsum("btr,ri->bti", d_h_BTR, a_RI)
    return d_x_BTI, d_a_RI, d_b_OR, jnp.zeros_like(scaling)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)
