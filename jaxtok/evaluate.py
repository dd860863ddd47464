"""Evaluation loss: mean next-token cross-entropy over every predicted token of every row; and the accuracy on new
tokens.

Rows are summed, not averaged per row: eval_loss = (sum over rows of their summed token losses) / (number of predicted
tokens), the definition `scripts/eval.py` documents and that PyTorch users get with `reduction="sum"`.

new_token_acc = (targets whose id is one of `new_ids` and that are their position's argmax) / (targets whose id is
one of `new_ids`): whether the model produces the added or trained tokens where the data has them. It is None where
no target is a new token.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxtok.data import SEQUENCE_KEYS, build_sequences
from jaxtok.errors import JaxtokError
from jaxtok.model import Llama


def read_text_rows(path: str | Path) -> list[str]:
    """The `text` field of every row of a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise JaxtokError(f"data file {path} does not exist")
    texts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxtokError(f"{path}:{number} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise JaxtokError(f'{path}:{number} has no "text" string; rows must look like {{"text": "..."}}')
            texts.append(row["text"])
    if not texts:
        raise JaxtokError(f"data file {path} has no rows")
    return texts


def tokenize_texts(tokenizer, texts: Iterable[str], seq_len: int) -> list[list[int]]:
    """Token ids with the tokenizer's default special tokens (a BOS where it adds one), cut to `seq_len`."""
    return [tokenizer(text)["input_ids"][:seq_len] for text in texts]


@functools.partial(jax.jit, static_argnames="model")
def _loss_sum(model: Llama, variables, tokens_BT, positions_BT, segments_BT, loss_mask_BT, hit_mask_BT):
    sums, _ = model.apply(variables, tokens_BT, positions_BT, segments_BT, loss_mask_BT=loss_mask_BT,
                          hit_mask_BT=hit_mask_BT)
    return sums


def evaluate_sequences(model: Llama, variables: dict, sequences: dict, batch_size: int = 8, progress=True,
                       place=jnp.asarray, new_ids: Sequence[int] = ()) -> dict:
    """{"eval_loss", "tokens", "new_token_acc", "new_tokens"} over sequences (`tokens`, `positions`, `segment_ids`,
    `loss_mask`, each [E, T]); `new_tokens` counts the targets that are one of `new_ids`.

    The batch shape is fixed ([batch_size, T], the last batch padded with empty rows), so it compiles once. `place`
    puts a [batch_size, T] host array on the devices (on a mesh: split over its batch axes).
    """
    total, count, hits, scored = 0.0, 0, 0, 0
    E, T = sequences["tokens"].shape
    for start in tqdm(range(0, E, batch_size), desc="eval", disable=not progress, leave=False):
        parts = {}
        for key in SEQUENCE_KEYS:
            parts[key] = np.zeros((batch_size, T), np.int32)
            rows = np.asarray(sequences[key][start : start + batch_size])
            parts[key][: len(rows)] = rows
        parts["hit_mask"] = parts["loss_mask"] * np.isin(parts["tokens"], np.asarray(new_ids, np.int64))
        sums = _loss_sum(model, variables, *(place(parts[key]) for key in (*SEQUENCE_KEYS, "hit_mask")))
        batch_total, batch_count, batch_hits, batch_scored = (float(x) for x in sums)
        total, count = total + batch_total, count + int(batch_count)
        hits, scored = hits + int(batch_hits), scored + int(batch_scored)
    if count == 0:
        raise JaxtokError("no row has two or more tokens, so there is nothing to predict")
    return {"eval_loss": total / count, "tokens": count, "new_token_acc": hits / scored if scored else None,
            "new_tokens": scored}


def evaluate(
    model: Llama, variables: dict, rows: Sequence[list[int]], seq_len: int, batch_size: int = 8, progress=True,
    new_ids: Sequence[int] = (),
) -> dict:
    """`evaluate_sequences` over `rows` (token id lists of at most seq_len), each padded to a row of its own
    (`data.build_sequences` without packing), every token after the first a target."""
    sequences = build_sequences([(row, [1] * len(row)) for row in rows], seq_len, packing=False)
    return evaluate_sequences(model, variables, sequences, batch_size, progress, new_ids=new_ids)
