"""A Flax (linen) Llama that computes what transformers' `LlamaForCausalLM` computes, and with the fields of
`LlamaConfig` for their differences (biases, q/k norms, sliding windows) what Mistral, Qwen2 and Qwen3 compute.

Names and einsum strings follow the shape legend of `jaxtok.shapes`.

Design choices:
* Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`) so
  the sharding code maps them onto a mesh in one place.
* Layers are one `nn.scan`, so their parameters are stacked on a leading `layers` axis and XLA compiles one layer
  instead of L copies (fast compiles, small programs).
* The frozen base lives in the `params` collection. Adapters live in collections of their own (`lora`, `tokens`),
  so training differentiates those pytrees only and never copies or updates the base.
* Attention takes explicit positions and segment ids: segment 0 marks padding, and keys are visible only to queries
  of the same segment, so left padding and packed documents need no special code.
* A sliding window is counted in slots of the sequence (or cache), as transformers counts it; each layer's window is
  a value scanned with the layer (0: full attention), so layers of different kinds stay one scan.
* Biases and q/k norm scales are frozen `params` like the kernels they belong to.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtok import tokens as tokens_lib
from jaxtok.attention import causal_attention
from jaxtok.layer_stack import residual_shapes, scan_layers
from jaxtok.llama_config import LlamaConfig
from jaxtok.lora import LoraConfig, lora_delta
from jaxtok.loss import Head, fused_next_token_loss, head_rows
from jaxtok.rope import apply_rope, rope_tables

# Gradient checkpointing of each layer: what the forward keeps for the backward. "none" keeps every activation
# autodiff wants; "full" keeps only each layer's input and recomputes the layer; "dots" keeps the outputs of the
# matmuls with weights (not attention's batched ones) and recomputes the cheap elementwise work between them.
REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}

Cache = dict[str, jnp.ndarray]  # k, v: [L, B, S, K, H]; segment_ids: [B, S]; index: scalar (next slot to write)


def _param(module: nn.Module, name: str, shape, axes: tuple[str, ...], dtype, init=nn.initializers.normal(0.02)):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """Over the last axis, whose logical name is `axis` (D, or H for Qwen3's per-head q/k norms)."""

    eps: float
    dtype: Any
    param_dtype: Any
    axis: str = "embed"

    @nn.compact
    def __call__(self, x_BTD):
        scale_D = _param(self, "scale", (x_BTD.shape[-1],), (self.axis,), self.param_dtype, nn.initializers.ones)
        # HF normalises in float32, casts back, then scales in the activation dtype.
        x32 = x_BTD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale_D.astype(self.dtype) * x32.astype(self.dtype)


# A projection's frozen matmul, x W with W flattened to [I, O], has its backward written out so that it keeps only
# W, as the layer scan's own slice of the stacked kernel, for x's gradient. Under autodiff of the einsum on the
# kernel as stored ([D, N, H] for q_proj, [N, H, D] for o_proj) XLA copied both kernels into a transposed layout in
# every layer's backward (and o_proj's in the forward), ~10 ms per layer at shape M of `scripts/benchmark.py`
# (JAX profiler); under autodiff of an einsum on the flattened kernel, the scan kept every layer's flattened q, k,
# v and o kernels as residuals (+80 MiB of XLA temp memory at shape M). This keeps neither: at shape M, 16
# interleaved in-process pairs of steps were 68 ms (1.7%) faster in the median, at the same temp memory.
# The kernel's gradient is computed only where the kernel is differentiated (never in training: it is frozen).
@jax.custom_vjp
def frozen_linear(x_BTI: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, I] times `kernel` ([*in, *out] with in features I in all, cast to x's dtype): [B, T, O]."""
    return _flat_matmul(x_BTI, kernel)


def _flat_matmul(x_BTI, kernel):
    return jnp.einsum("bti,io->bto", x_BTI, kernel.astype(x_BTI.dtype).reshape(x_BTI.shape[-1], -1))


def _frozen_linear_fwd(x, kernel):  # CustomVJPPrimal pairs (value, perturbed), as symbolic_zeros=True passes them
    x_BTI = x.value
    return _flat_matmul(x_BTI, kernel.value), (x_BTI if kernel.perturbed else None, kernel.value)


def _frozen_linear_bwd(residuals, d_y_BTO):
    x_BTI, kernel = residuals
    w_IO = kernel.astype(d_y_BTO.dtype).reshape(-1, d_y_BTO.shape[-1])
    d_x_BTI = jnp.einsum("bto,io->bti", d_y_BTO, w_IO)
    if x_BTI is None:
        return d_x_BTI, None
    return d_x_BTI, jnp.einsum("bti,bto->io", x_BTI, d_y_BTO).reshape(kernel.shape).astype(kernel.dtype)


frozen_linear.defvjp(_frozen_linear_fwd, _frozen_linear_bwd, symbolic_zeros=True)


class Projection(nn.Module):
    """A frozen linear map `kernel` [*in_shape, *out_shape] (named like HF's module: q_proj, ..., down_proj) from
    the trailing `in_shape` axes of its input to `out_shape` axes, its frozen `bias` [*out_shape] if `bias`, plus
    its LoRA branch if targeted."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    lora: Optional[LoraConfig]
    dtype: Any
    param_dtype: Any
    bias: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        shape, axes = self.in_shape + self.out_shape, self.in_axes + self.out_axes
        kernel = _param(self, "kernel", shape, axes, self.param_dtype)
        B, T = x.shape[:2]
        x_BTI = x.reshape(B, T, -1)
        y = frozen_linear(x_BTI, kernel).reshape(B, T, *self.out_shape)
        if self.bias:
            y = y + _param(self, "bias", self.out_shape, self.out_axes, self.param_dtype,
                           nn.initializers.zeros).astype(self.dtype)
        if self.lora is None or self.name not in self.lora.targets:
            return y
        axes = (self.in_axes[0], self.out_axes[0])
        delta = lora_delta(self, x_BTI, self.lora, math.prod(self.out_shape), axes, train, self.dtype)
        return y + delta.reshape(y.shape)


class Attention(nn.Module):
    config: LlamaConfig
    lora: Optional[LoraConfig]
    dtype: Any
    param_dtype: Any
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x_BTD, cos, sin, mask_BTS, kv_cache=None, cache_index=None, train=False):
        c = self.config
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        kv = dict(in_shape=(D,), out_shape=(K, H), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
        q_BTNH = Projection((D,), (N, H), ("embed",), ("heads", "head_dim"), name="q_proj", bias="q_proj" in c.biases,
                            **kw)(x_BTD, train)
        k_BTKH = Projection(name="k_proj", bias="k_proj" in c.biases, **kv)(x_BTD, train)
        v_BTKH = Projection(name="v_proj", bias="v_proj" in c.biases, **kv)(x_BTD, train)
        if c.qk_norm:  # Qwen3: each head normalised over H, before RoPE
            norm = dict(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, axis="head_dim")
            q_BTNH, k_BTKH = RMSNorm(name="q_norm", **norm)(q_BTNH), RMSNorm(name="k_norm", **norm)(k_BTKH)
        q_BTNH, k_BTKH = apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            start = (0, cache_index, 0, 0)
            k_BSKH = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), start)
            v_BSKH = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), start)
            kv_cache = (k_BSKH, v_BSKH)
            k_BTKH, v_BTKH = k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype)
        if kv_cache is None and self.attention_impl is None:
            out_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS)
        else:
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BTKH, v_BTKH, mask=mask_BTS[:, None, :, :], implementation=self.attention_impl
            )
        out_BTD = Projection((N, H), (D,), ("heads", "head_dim"), ("embed",), name="o_proj",
                             bias="o_proj" in c.biases, **kw)(out_BTNH, train)
        return out_BTD, kv_cache


# The MLP's activation keeps only its two inputs for the backward and recomputes the rest there. Under autodiff it
# kept four [B, T, F] intermediates per layer: at shape M of `scripts/benchmark.py` (8 layers, F = 4096, 1,024
# tokens) the step's XLA temp memory was 1,208 MiB, and 840 MiB with this. On CPU each step's temp pages are mapped
# afresh (309k page faults per step before, 215k after), so the smaller buffer also made the step ~6% faster.
@jax.custom_vjp
def swiglu(gate_BTF: jnp.ndarray, up_BTF: jnp.ndarray) -> jnp.ndarray:
    """silu(gate) * up, as transformers' LlamaMLP computes it."""
    return jax.nn.silu(gate_BTF) * up_BTF


def _swiglu_fwd(gate_BTF, up_BTF):
    return swiglu(gate_BTF, up_BTF), (gate_BTF, up_BTF)


def _swiglu_bwd(residuals, d_h_BTF):
    gate_BTF, up_BTF = residuals
    sigmoid_BTF = jax.nn.sigmoid(gate_BTF)
    silu_BTF = gate_BTF * sigmoid_BTF
    d_gate_BTF = d_h_BTF * up_BTF * (sigmoid_BTF + silu_BTF * (1 - sigmoid_BTF))
    return d_gate_BTF, d_h_BTF * silu_BTF


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
    config: LlamaConfig
    lora: Optional[LoraConfig]
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BTD, train=False):
        D, F, biases = self.config.hidden_size, self.config.intermediate_size, self.config.biases
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        up = dict(in_shape=(D,), out_shape=(F,), in_axes=("embed",), out_axes=("mlp",), **kw)
        gate_BTF = Projection(name="gate_proj", bias="gate_proj" in biases, **up)(x_BTD, train)
        up_BTF = Projection(name="up_proj", bias="up_proj" in biases, **up)(x_BTD, train)

        def down(mlp: Mlp, gate_BTF, up_BTF):
            return Projection((F,), (D,), ("mlp",), ("embed",), name="down_proj",
                              bias="down_proj" in biases, parent=mlp, **kw)(swiglu(gate_BTF, up_BTF), train)

        # down_proj's LoRA keeps its input, silu(gate) * up, for the gradient of A. Recomputed from gate and up,
        # which the activation keeps anyway, it costs one elementwise pass and one rank-R matmul in the backward
        # (the frozen matmul is not redone: nothing in the backward needs its output), and the step keeps L x
        # [B, T, F] less: at shape M of `scripts/benchmark.py`, XLA temp memory 712 instead of 840 MiB, and the
        # step no slower (8 interleaved in-process pairs: 0.8% faster on average, within this CPU's noise).
        # prevent_cse=False is safe here because the layers always run under a scan.
        return nn.remat(down, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)(
            self, gate_BTF, up_BTF)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    lora: Optional[LoraConfig]
    dtype: Any
    param_dtype: Any
    attention_impl: Optional[str] = None
    train: bool = False  # an attribute, not an argument, so it stays a Python bool inside the scan

    @nn.compact
    def __call__(self, x_BTD, cos, sin, mask_BTS, cache_index, kv_cache, window):
        """`window`: this layer's sliding window (a traced scalar, 0 for full attention), or None: no layer slides."""
        train = self.train
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if window is not None:
            mask_BTS = mask_BTS & sliding_window_mask(mask_BTS.shape[1], mask_BTS.shape[2], cache_index, window)[None]
        h_BTD = RMSNorm(c.rms_norm_eps, name="attn_norm", **kw)(x_BTD)
        h_BTD, kv_cache = Attention(c, self.lora, attention_impl=self.attention_impl, name="attn", **kw)(
            h_BTD, cos, sin, mask_BTS, kv_cache, cache_index, train
        )
        x_BTD = x_BTD + h_BTD
        h_BTD = RMSNorm(c.rms_norm_eps, name="mlp_norm", **kw)(x_BTD)
        return x_BTD + Mlp(c, self.lora, name="mlp", **kw)(h_BTD, train), kv_cache


def attention_mask(q_segment_BT, kv_segment_BS, cache_index=0) -> jnp.ndarray:
    """[B, T, S] boolean: causal over cache slots, within one segment, never to padding (segment 0).

    The query of position t sits in slot cache_index + t, key s in slot s (the whole sequence, or the cache)."""
    T, S = q_segment_BT.shape[1], kv_segment_BS.shape[1]
    causal_TS = jnp.arange(S)[None, :] <= (cache_index + jnp.arange(T))[:, None]
    same_BTS = q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]
    return causal_TS[None] & same_BTS & (kv_segment_BS != 0)[:, None, :]


def sliding_window_mask(T: int, S: int, cache_index, window) -> jnp.ndarray:
    """[T, S] boolean, slots as in `attention_mask`: key slot s is within `window` of query slot q when
    s > q - window (transformers' `sliding_window_overlay`): with the causal mask, a query sees itself and the
    window - 1 keys before it. `window` 0 keeps every key (a layer of full attention)."""
    q_T1 = cache_index + jnp.arange(T)[:, None]
    return (jnp.arange(S)[None, :] > q_T1 - window) | (window == 0)


class Llama(nn.Module):
    """`LlamaForCausalLM`, optionally with LoRA (`lora` collection) and trainable token rows (`tokens` collection).

    `dtype` is the compute dtype, `param_dtype` the dtype of the frozen weights; adapters are float32.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: Optional[LoraConfig] = None
    token_rows: tokens_lib.TokenRows = tokens_lib.TokenRows()
    remat: str = "none"  # a key of REMAT_POLICIES
    attention_impl: Optional[str] = None  # None: `causal_attention` (JAX's with a cache); "xla"/"cudnn": JAX's
    loss_chunk: int = 0  # positions per chunk of the fused loss (evaluation, a trained head); 0 chooses
    loss_vocab_block: int = 0  # head rows per block of the fused loss (training a frozen head); 0 chooses

    @nn.compact
    def __call__(
        self,
        tokens_BT: jnp.ndarray,
        positions_BT: Optional[jnp.ndarray] = None,
        segment_ids_BT: Optional[jnp.ndarray] = None,
        cache: Optional[Cache] = None,
        train: bool = False,
        loss_mask_BT: Optional[jnp.ndarray] = None,
        last_only: bool = False,
        hit_mask_BT: Optional[jnp.ndarray] = None,
    ) -> tuple[Any, Optional[Cache]]:
        """Returns logits [B, T, V] (compute dtype) and, when a cache is given, the cache with these tokens written.

        With `loss_mask_BT`, returns instead of logits the (sum, count) of the next-token cross-entropy over the
        targets the mask marks, from the fused chunked head + loss of `jaxtok.loss`: no [B, T, V] logits are made.
        With `hit_mask_BT` as well (evaluation), (sum, count, hits, scored): how many of the targets it marks are
        their position's argmax.
        `last_only` returns the logits of the last position only, [B, 1, V] (generation). `train` turns on LoRA
        dropout (needs a `dropout` rng).
        """
        c, rows = self.config, self.token_rows
        # a wrong shape fails here by name, not deep inside XLA (these run once, while tracing)
        chex.assert_rank(tokens_BT, 2)
        chex.assert_type(tokens_BT, int)
        B, T = tokens_BT.shape
        chex.assert_shape([x for x in (positions_BT, segment_ids_BT, loss_mask_BT, hit_mask_BT) if x is not None],
                          (B, T))
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)

        embedding_VD = _param(self, "embed", (c.vocab_size, c.hidden_size), ("vocab", "embed"), self.param_dtype)
        embed_table_MD = None
        if rows.embed_ids:
            ids = jnp.asarray(rows.embed_ids)
            embed_table_MD = tokens_lib.table(self, "embed", lambda: jnp.take(embedding_VD, ids, axis=0))
        x_BTD = tokens_lib.embed(embedding_VD, tokens_BT, rows.embed_ids, embed_table_MD, self.dtype)
        cos, sin = rope_tables(c, positions_BT, self.dtype)

        cache_index: int | jax.Array
        if cache is None:
            cache_index, kv_segments_BS, kv_cache = 0, segment_ids_BT, None
        else:
            cache_index = cache["index"]
            kv_segments_BS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BT, (0, cache_index))
            kv_cache = (cache["k"], cache["v"])
        mask_BTS = attention_mask(segment_ids_BT, kv_segments_BS, cache_index)

        windows_L = jnp.asarray(c.layer_windows, jnp.int32) if c.layer_windows else None
        if train and cache is None and self.is_mutable_collection("residuals") and not self.is_initializing():
            x_BTD = self._layers_with_buffers(x_BTD, cos, sin, mask_BTS, windows_L)
        else:
            layer = DecoderLayer
            if self.remat != "none":
                layer = nn.remat(layer, prevent_cse=False, policy=REMAT_POLICIES[self.remat])
            layers = nn.scan(
                layer,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 4 + (0, 0),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.lora, dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
              train=train, name="layers")
            x_BTD, kv_cache = layers(x_BTD, cos, sin, mask_BTS, cache_index, kv_cache, windows_L)

        x_BTD = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x_BTD)
        head = self._head(embedding_VD, embed_table_MD)
        if loss_mask_BT is not None:
            out = fused_next_token_loss(head, x_BTD, tokens_BT, loss_mask_BT, self.loss_chunk, hit_mask_BT,
                                        self.loss_vocab_block)
        else:
            out = head.logits(x_BTD[:, -1:] if last_only else x_BTD)

        if cache is not None:
            assert kv_cache is not None  # the scan ran with the cache
            k, v = kv_cache
            cache = dict(k=k, v=v, segment_ids=kv_segments_BS, index=cache["index"] + T)
        return out, cache

    def _layers_with_buffers(self, x_BTD, cos, sin, mask_BTS, windows_L):
        """The layers of a train step (as the scan of `__call__` computes them) whose backward keeps its residuals in
        the `residuals` collection's buffers (`jaxtok.layer_stack`; zeros of the right shapes where it has none)."""
        c = self.config
        module = DecoderLayer(c, self.lora, dtype=self.dtype, param_dtype=self.param_dtype,
                              attention_impl=self.attention_impl, train=True, parent=None)
        dropout = self.lora is not None and self.lora.dropout > 0.0
        # one dropout key per layer, as the scan splits them (not the same keys: the two paths draw different masks)
        rngs_L = jax.random.split(self.make_rng("dropout"), c.num_layers) if dropout else None

        def layer(frozen_l, trained_l, x_BTD, consts, xs_l):
            (cos, sin, mask_BTS), (window, rng) = consts, xs_l
            variables = {"params": frozen_l, **({"lora": trained_l} if trained_l else {})}

            def apply(variables, x_BTD):
                return module.apply(variables, x_BTD, cos, sin, mask_BTS, 0, None, window,
                                    rngs={"dropout": rng} if dropout else None)[0]

            if self.remat != "none":
                apply = jax.checkpoint(apply, prevent_cse=False, policy=REMAT_POLICIES[self.remat])
            return apply(variables, x_BTD)

        frozen_L = self.variables["params"]["layers"]
        trained_L = self.variables.get("lora", {}).get("layers", {})
        args = (layer, frozen_L, trained_L, x_BTD, (cos, sin, mask_BTS), (windows_L, rngs_L))
        if self.has_variable("residuals", "buffers"):
            buffers = self.get_variable("residuals", "buffers")
        else:
            buffers = tuple(jnp.zeros(a.shape, a.dtype) for a in residual_shapes(*args))
        x_BTD, buffers = scan_layers(*args, buffers)
        self.put_variable("residuals", "buffers", buffers)
        return x_BTD

    def _head(self, embedding_VD, embed_table_MD) -> Head:
        """The output matrix (the embedding when tied) and the corrections of its trainable token rows."""
        c, rows = self.config, self.token_rows
        if c.tie_word_embeddings:
            weight, layout, ids = embedding_VD, "vd", rows.embed_ids
        else:
            weight = _param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), self.param_dtype)
            layout, ids = "dv", rows.head_ids
        if not ids:
            return Head(weight, layout)
        frozen_MD = head_rows(weight, layout, jnp.asarray(ids, jnp.int32))
        table_MD = embed_table_MD if c.tie_word_embeddings else tokens_lib.table(self, "head", lambda: frozen_MD)
        assert table_MD is not None  # a tied head's rows are the embedding's, made whenever there are ids
        delta_MD = (table_MD - frozen_MD.astype(table_MD.dtype)).astype(self.dtype)
        return Head(weight, layout, ids, delta_MD)


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> Cache:
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    return dict(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def abstract_variables(model: Llama) -> dict:
    """Shapes, dtypes and logical axis names of every variable (params, lora, tokens), without allocating any."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return dict(jax.eval_shape(model.init, jax.random.key(0), tokens))


def abstract_params(model: Llama) -> dict:
    """The frozen `params` of `abstract_variables` (boxed ShapeDtypeStructs)."""
    return abstract_variables(model)["params"]


def logical_axes_of(model: Llama) -> dict:
    """A tree like the variables whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(abstract_variables(model))
