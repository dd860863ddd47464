"""What trains: one labelling function over every variable, and the split of variables into trainable and frozen.

The model's variables are collections: `params` (the frozen base), `lora`, `tokens`. `label` gives each leaf one of

    "lora"        LoRA A and B                              (trained, optimizer group "lora")
    "tokens"      trainable token rows                      (trained, group "tokens": own lr, no decay by default)
    "embeddings"  the whole embedding and head, only when   (trained, group "embeddings"; the costly baseline
                  full-embedding training is asked for       that trainable tokens replace)
    "frozen"      everything else                           (no gradient, no optimizer state)

`split` uses the labels to cut the variables into a trainable tree (differentiated, optimized, checkpointed) and a
frozen tree (passed through untouched), and `merge` puts them back together for `model.apply`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtok.model import Llama

GROUPS = ("lora", "tokens", "embeddings")
FROZEN = "frozen"
EMBEDDING_PATHS = (("params", "embed"), ("params", "lm_head"))


def label(path: tuple[str, ...], full_embeddings: bool = False) -> str:
    """The label of the variable at `path` (collection first, e.g. ("lora", "layers", "attn", "q_proj", "a"))."""
    collection = path[0]
    if collection in ("lora", "tokens"):
        return collection
    if collection == "params":
        return "embeddings" if full_embeddings and tuple(path[:2]) in EMBEDDING_PATHS else FROZEN
    raise ValueError(f"unknown variable collection {collection!r} at {'/'.join(path)}")


def _key(entry) -> str:
    return str(getattr(entry, "key", entry))


def labels(tree: Any, full_embeddings: bool = False, prefix: tuple[str, ...] = ()) -> Any:
    """A tree like `tree` with the label of every leaf; `prefix` is the path of `tree` itself."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: label(prefix + tuple(_key(p) for p in path), full_embeddings), tree
    )


def split(variables: dict, full_embeddings: bool = False) -> tuple[dict, dict]:
    """(trainable, frozen): two trees with the same nesting as `variables`, each holding its own leaves only."""
    trainable, frozen = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = tuple(_key(p) for p in path)
        target = frozen if label(keys, full_embeddings) == FROZEN else trainable
        node = target
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return trainable, frozen


def merge(a: dict, b: dict) -> dict:
    """The union of two disjoint variable trees (nested dicts)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def init_adapters(model: Llama, params: dict, rng: jax.Array, shardings=None) -> dict:
    """Fresh `lora` and `tokens` collections for `model` over the loaded `params`.

    The variables' own init functions run (one forward on a single token with those collections mutable), so token
    rows start as copies of the loaded rows and LoRA as PEFT initialises it. `shardings` (a tree like the result)
    places them on a mesh.
    """

    def init(params, rng):
        _, adapters = model.apply(
            {"params": params}, jnp.zeros((1, 1), jnp.int32), rngs={"params": rng}, mutable=["lora", "tokens"]
        )
        return adapters

    return nn.unbox(dict(jax.jit(init, out_shardings=shardings)(params, rng)))
