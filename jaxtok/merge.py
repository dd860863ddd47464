"""Folding adapters into the base weights, for a merged checkpoint and for tests of what training changed.

LoRA: W += scaling * (B A)^T in our [in, out] layout (PEFT's `W += scaling * B @ A` in torch's [out, in]).
Token rows: the table's rows are written into the embedding, and for an untied head into the head's rows. A tied
head has no matrix of its own, so it stays tied and picks the rows up from the embedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtok.model import Llama


def merge_adapters(model: Llama, params: dict, adapters: dict) -> dict:
    """The base `params` with `adapters` ({"lora": ..., "tokens": ...}) folded in, in the params' own dtypes."""
    merged = jax.tree.map(lambda x: x, params)  # a new tree; leaves are replaced, never mutated
    scaling = model.lora.scaling if model.lora else 0.0
    for block, modules in adapters.get("lora", {}).get("layers", {}).items():
        for name, ab in modules.items():
            kernel = merged["layers"][block][name]["kernel"]
            delta_LOI = jnp.einsum("lor,lri->loi", ab["b"], ab["a"]) * scaling
            delta = jnp.swapaxes(delta_LOI, 1, 2).reshape(kernel.shape)
            merged["layers"][block][name] = {"kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
    tables = adapters.get("tokens", {})
    rows = model.token_rows
    if "embed" in tables:
        embed = merged["embed"]
        merged["embed"] = embed.at[jnp.asarray(rows.embed_ids)].set(tables["embed"].astype(embed.dtype))
    if "head" in tables:
        head = merged["lm_head"]
        merged["lm_head"] = head.at[:, jnp.asarray(rows.head_ids)].set(tables["head"].T.astype(head.dtype))
    return merged
