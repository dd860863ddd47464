"""What trains: the methods, one labelling function over every variable, and the split into trainable and frozen.

A method names what trains (`train.method`; the same names in reports and the README):

    lora        LoRA only; added tokens keep their initial rows, frozen
    lora+rows   LoRA and the token rows (added tokens and tokens.train)
    lora+full   LoRA and the whole embedding and head (the costly baseline that token rows replace)
    rows        the token rows only, no LoRA (PEFT's TrainableTokensConfig)

The model's variables are collections: `params` (the frozen base), `lora`, `tokens`. `label` gives each leaf one of

    "lora"        LoRA A and B                              (trained, optimizer group "lora")
    "tokens"      trainable token rows                      (trained, group "tokens": own lr, no decay by default)
    "embeddings"  the whole embedding and head              (trained, group "embeddings")
    "frozen"      everything else, and what the method     (no gradient, no optimizer state)
                  does not train

`split` uses the labels to cut the variables into a trainable tree (differentiated, optimized, checkpointed) and a
frozen tree (passed through untouched), and `merge` puts them back together for `model.apply`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtok.errors import JaxtokError
from jaxtok.model import Llama

GROUPS = ("lora", "tokens", "embeddings")
FROZEN = "frozen"
EMBEDDING_PATHS = (("params", "embed"), ("params", "lm_head"))


@dataclasses.dataclass(frozen=True)
class Method:
    lora: bool  # LoRA trains
    rows: bool  # token rows train
    full: bool  # the whole embedding and head train


METHODS = {
    "lora": Method(lora=True, rows=False, full=False),
    "lora+rows": Method(lora=True, rows=True, full=False),
    "lora+full": Method(lora=True, rows=False, full=True),
    "rows": Method(lora=False, rows=True, full=False),
}
DEFAULT_METHOD = "lora+rows"


def method(name: str) -> Method:
    """The method called `name`; an unknown name is an error that lists the known ones."""
    if name not in METHODS:
        raise JaxtokError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def label(path: tuple[str, ...], method_name: str = DEFAULT_METHOD) -> str:
    """The label of the variable at `path` (collection first, e.g. ("lora", "layers", "attn", "q_proj", "a"))
    under the method `method_name`."""
    m, collection = method(method_name), path[0]
    if collection == "lora":
        return "lora" if m.lora else FROZEN
    if collection == "tokens":
        return "tokens" if m.rows else FROZEN
    if collection == "params":
        return "embeddings" if m.full and tuple(path[:2]) in EMBEDDING_PATHS else FROZEN
    raise ValueError(f"unknown variable collection {collection!r} at {'/'.join(path)}")


def _key(entry) -> str:
    return str(getattr(entry, "key", entry))


def labels(tree: Any, method_name: str = DEFAULT_METHOD, prefix: tuple[str, ...] = ()) -> Any:
    """A tree like `tree` with the label of every leaf; `prefix` is the path of `tree` itself."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: label(prefix + tuple(_key(p) for p in path), method_name), tree
    )


def split(variables: dict, method_name: str = DEFAULT_METHOD) -> tuple[dict, dict]:
    """(trainable, frozen): two trees with the same nesting as `variables`, each holding its own leaves only."""
    trainable: dict = {}
    frozen: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = tuple(_key(p) for p in path)
        target = frozen if label(keys, method_name) == FROZEN else trainable
        node = target
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return trainable, frozen


def adapters_of(variables: dict) -> dict:
    """The `lora` and `tokens` collections of `variables`: what a PEFT adapter or a merge takes."""
    return {k: v for k, v in variables.items() if k in ("lora", "tokens")}


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
