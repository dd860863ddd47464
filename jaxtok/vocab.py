"""Choosing the token rows to train: adding new special tokens, naming existing ones, and planning the tables.

New tokens are added to the tokenizer as special tokens (never split, never merged) and the frozen embedding (and an
untied head) grow to hold them. Their rows start as the mean of the existing rows, or, given a description per
token, as the mean of the rows of the description's tokens; either way they then train through the token table.
This happens once, at set-up: the training step itself never builds a vocab x D array.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax.numpy as jnp

from jaxtok.errors import JaxtokError
from jaxtok.llama_config import LlamaConfig
from jaxtok.tokens import TokenRows, validate_ids

HEAD_CHOICES = ("added", "all", "none")


def add_tokens(
    tokenizer,
    params: dict,
    config: LlamaConfig,
    new_tokens: Sequence[str],
    descriptions: Optional[Sequence[str]] = None,
) -> tuple[dict, LlamaConfig, tuple[int, ...]]:
    """Adds `new_tokens` to `tokenizer` (in place) and grows `params`; returns (params, config, new ids).

    The vocabulary becomes max(config.vocab_size, len(tokenizer)): checkpoints whose matrices already have spare
    rows beyond the tokenizer use them.
    """
    if not new_tokens:
        return params, config, ()
    vocab = tokenizer.get_vocab()
    seen = set()
    for token in new_tokens:
        if not isinstance(token, str) or not token:
            raise JaxtokError(f"tokens.add: new token {token!r} must be a non-empty string")
        if token in vocab:
            raise JaxtokError(f"tokens.add: token {token!r} is already in the vocabulary (id {vocab[token]}); "
                              "list it under tokens.train instead")
        if token in seen:
            raise JaxtokError(f"tokens.add: new token {token!r} is listed twice")
        seen.add(token)
    if descriptions is not None and len(descriptions) != len(new_tokens):
        raise JaxtokError(f"tokens.descriptions: got {len(descriptions)} descriptions for {len(new_tokens)} new "
                          "tokens (tokens.add); give one per token")

    # Rows the descriptions average over are found before the tokenizer changes, so they use old tokens only.
    description_ids = None
    if descriptions is not None:
        description_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in descriptions]
        for token, ids in zip(new_tokens, description_ids):
            if not ids:
                raise JaxtokError(f"tokens.descriptions: the description of {token!r} is empty; describe it in a "
                                  "few words")
    tokenizer.add_tokens(list(new_tokens), special_tokens=True)
    new_ids = tuple(tokenizer.convert_tokens_to_ids(list(new_tokens)))
    new_vocab = max(config.vocab_size, len(tokenizer))

    params, config = grow_vocab(params, config, new_vocab, new_ids, description_ids)
    return params, config, new_ids


def grow_vocab(params: dict, config: LlamaConfig, vocab_size: int, init_ids: Sequence[int],
               description_ids: Optional[Sequence[Sequence[int]]] = None) -> tuple[dict, LlamaConfig]:
    """`params` and `config` with `vocab_size` rows in the embedding (and an untied head). Rows `init_ids` start as
    the mean of the old rows, or with `description_ids`, as the mean of those rows; other new rows are zero."""
    params = dict(params)
    params["embed"] = _grow(params["embed"], init_ids, vocab_size, description_ids)
    if not config.tie_word_embeddings:
        params["lm_head"] = _grow(params["lm_head"].T, init_ids, vocab_size, description_ids).T
    return params, dataclasses.replace(config, vocab_size=vocab_size)


def _grow(rows_VD, new_ids, new_vocab: int, description_ids) -> jnp.ndarray:
    # jnp, not numpy: the rows may be sharded over devices and hosts, and jit keeps them so.
    old_vocab, D = rows_VD.shape
    mean_D = jnp.mean(rows_VD.astype(jnp.float32), axis=0)
    inits = [mean_D if description_ids is None else jnp.mean(rows_VD[jnp.asarray(ids)].astype(jnp.float32), axis=0)
             for ids in (description_ids or [None] * len(new_ids))]
    grown = jnp.concatenate([rows_VD, jnp.zeros((new_vocab - old_vocab, D), rows_VD.dtype)], axis=0)
    return grown.at[jnp.asarray(new_ids)].set(jnp.stack(inits).astype(rows_VD.dtype))


def resolve_tokens(tokenizer, items: Sequence[Union[str, int]], vocab_size: int,
                   key: str = "tokens.train") -> tuple[int, ...]:
    """Ids of existing tokens named by string or id; unknown strings, bad ids and duplicates are errors that name
    `key`, the config key the tokens came from."""
    vocab = tokenizer.get_vocab()
    ids = []
    for item in items:
        if isinstance(item, str) and not item.lstrip("-").isdigit():
            if item not in vocab:
                raise JaxtokError(f"{key}: unknown token {item!r}: it is not in the tokenizer's vocabulary; "
                                  "add it with tokens.add, or name a token the tokenizer has")
            ids.append(vocab[item])
        else:
            ids.append(int(item))
        if ids[-1] in ids[:-1]:
            raise JaxtokError(f"{key}: token {item!r} (id {ids[-1]}) is listed twice")
    validate_ids(ids, vocab_size, key, allow_empty=True)
    return tuple(ids)


def plan_rows(added: Sequence[int], trained: Sequence[int], tied: bool, head: str = "added",
              untrained: Sequence[int] = ()) -> TokenRows:
    """The token tables: every added, trained and untrained id in the embedding table; for an untied head, the ids
    `head` names ("added": the new tokens and the base's `untrained` ones, whose head rows are untrained too; "all";
    or "none"). An untrained id also listed in `trained` is planned once."""
    if head not in HEAD_CHOICES:
        raise JaxtokError(f"tokens.train_head must be one of {', '.join(HEAD_CHOICES)} (got {head!r})")
    overlap = set(added) & set(trained)
    if overlap:
        raise JaxtokError(f"tokens.add, tokens.train: token ids {sorted(overlap)} are both added and listed as "
                          "existing tokens to train")
    untrained = tuple(i for i in untrained if i not in added)
    embed_ids = tuple(added) + tuple(trained) + tuple(i for i in untrained if i not in trained)
    if tied or head == "none":
        return TokenRows(embed_ids, ())
    return TokenRows(embed_ids, tuple(added) + untrained if head == "added" else embed_ids)
