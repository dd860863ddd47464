"""Trainable token rows: a small table [M, D] that replaces M rows of the frozen embedding (and head).

PEFT's semantics (`LoraConfig(trainable_token_indices=...)`): the table holds absolute rows, not differences, starts as
a copy of the current rows, and row k stands for token `ids[k]`. With a tied head the logits of those tokens come from
the same rows; an untied head may get a second table for its own rows of (usually) the same ids.

PEFT builds a copy of the whole V x D matrix with the rows replaced, on every forward and again for a tied head. Here
no V x D array is made for the rows: the embedding gathers from the frozen matrix and then swaps in the table's rows
for matching tokens ([B, T, M] one-hot), and the head adds x . (row - frozen row) to the M frozen logits
(`jaxtok.loss.Head`).
Gradients reach the table through those M-sized products only.

    params/embed         [V, D]  frozen        tokens/embed  [M, D]  float32, trained
    params/lm_head       [D, V]  frozen        tokens/head   [M, D]  float32, trained (untied heads only; its own M)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxtok.errors import JaxtokError


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """Which rows train: `embed_ids` for the embedding (and a tied head), `head_ids` for an untied head."""

    embed_ids: tuple[int, ...] = ()
    head_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "embed_ids", tuple(int(i) for i in self.embed_ids))
        object.__setattr__(self, "head_ids", tuple(int(i) for i in self.head_ids))

    def __bool__(self) -> bool:
        return bool(self.embed_ids or self.head_ids)

    def validate(self, vocab_size: int, tied: bool) -> None:
        if tied and self.head_ids:
            raise JaxtokError("the model ties its head to the embedding, so head rows train with the embedding rows; "
                              "leave head ids empty")
        for name, ids in (("embedding", self.embed_ids), ("head", self.head_ids)):
            validate_ids(ids, vocab_size, f"trainable {name} rows", allow_empty=True)


def validate_ids(ids: Sequence[int], vocab_size: int, what: str = "token ids", allow_empty: bool = False) -> None:
    """In range, no duplicates, at least one (unless allowed); the error names the offending id."""
    if not ids and not allow_empty:
        raise JaxtokError(f"{what}: name at least one token")
    seen = set()
    for i in ids:
        if not 0 <= i < vocab_size:
            raise JaxtokError(f"{what}: token id {i} is out of range; the vocabulary has ids 0..{vocab_size - 1}")
        if i in seen:
            raise JaxtokError(f"{what}: token id {i} is listed twice")
        seen.add(i)


def table(module: nn.Module, name: str, init_rows) -> jnp.ndarray:
    """The `tokens/<name>` table [M, D], initialised from the current rows (a fresh table is a no-op)."""
    init = nn.with_logical_partitioning(lambda: init_rows().astype(jnp.float32), ("token_rows", "embed"))
    # flax types `.value` as the LogicallyPartitioned box that `init` returns; it gives the unboxed array
    return module.variable("tokens", name, init).value  # type: ignore[return-value]


def embed(embedding_VD, tokens_BT, ids: tuple[int, ...], table_MD, dtype):
    """Embedding lookup with the table's rows in place of rows `ids`."""
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(dtype)
    if not ids:
        return x_BTD
    match_BTM = tokens_BT[..., None] == jnp.asarray(ids)
    swapped_BTD = jnp.einsum("btm,md->btd", match_BTM.astype(dtype), table_MD.astype(dtype))
    return jnp.where(jnp.any(match_BTM, axis=-1, keepdims=True), swapped_BTD, x_BTD)
