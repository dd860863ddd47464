"""Folding adapters into the base weights, for a merged checkpoint and for tests of what training changed.

LoRA: W += scaling * (B A)^T in our [in, out] layout (PEFT's `W += scaling * B @ A` in torch's [out, in]).
Token rows: the table's rows are written into the embedding, and for an untied head into the head's rows. A tied
head has no matrix of its own, so it stays tied and picks the rows up from the embedding.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxtok.model import Llama


def merge_adapters(model: Llama, params: dict, adapters: dict, dtype: Optional[Any] = None) -> dict:
    """The base `params` with `adapters` ({"lora": ..., "tokens": ...}) folded in.

    The leaves adapters change come out in `dtype` (default: each leaf's own dtype); the sum is formed in float32
    either way, so a bfloat16 base exported as float32 is not rounded to bfloat16 first. Other leaves are untouched.
    """
    if adapters.get("lora") and model.lora is None:
        raise ValueError("adapters hold LoRA weights but the model has no LoRA config (model.lora is None)")
    merged = jax.tree.map(lambda x: x, params)  # a new tree; leaves are replaced, never mutated
    scaling = model.lora.scaling if model.lora else 0.0
    for block, modules in adapters.get("lora", {}).get("layers", {}).items():
        for name, ab in modules.items():
            kernel = merged["layers"][block][name]["kernel"]
            # HIGHEST: accelerators otherwise multiply float32 in reduced precision, and the product is the weight.
            delta_LOI = jnp.einsum("lor,lri->loi", jnp.asarray(ab["b"], jnp.float32), jnp.asarray(ab["a"], jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST) * scaling
            delta = jnp.swapaxes(delta_LOI, 1, 2).reshape(kernel.shape)
            out = dtype or kernel.dtype
            # a bias, if any, is frozen: it stays as it is
            merged["layers"][block][name] = {**merged["layers"][block][name],
                                             "kernel": (kernel.astype(jnp.float32) + delta).astype(out)}
    tables = adapters.get("tokens", {})
    rows = model.token_rows
    if "embed" in tables:
        embed = merged["embed"].astype(dtype or merged["embed"].dtype)
        merged["embed"] = embed.at[jnp.asarray(rows.embed_ids)].set(jnp.asarray(tables["embed"]).astype(embed.dtype))
    if "head" in tables:
        head = merged["lm_head"].astype(dtype or merged["lm_head"].dtype)
        merged["lm_head"] = head.at[:, jnp.asarray(rows.head_ids)].set(jnp.asarray(tables["head"]).T.astype(head.dtype))
    return merged
