"""Hugging Face `LlamaForCausalLM` tensors <-> jaxtok parameters, as one declarative table.

Each row names an HF tensor (`{i}` is the layer index), the path of our parameter, and the transform between the
two layouts. HF stores Linear weights as [out, in]; we store kernels as [in, out] with heads split out, so einsums read
`btd,dnh->btnh`. Per-layer tensors are stacked on our leading `layers` axis.

The other families of `llama_config.FAMILIES` name their tensors as Llama does; what they add are rows whose
parameter only some configs have (biases, Qwen3's q/k norms). A row is expected exactly when the model of the
config.json has its parameter, so the same table serves every family with the same strictness.

Loading checks that every tensor of the checkpoint is used, every parameter is filled and every shape is right, and
names the tensor and file when not. Export (later) runs the same table backwards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxtok.errors import JaxtokError
from jaxtok.hf_io import iter_tensors, read_json, resolve_model_dir, weight_files
from jaxtok.llama_config import LlamaConfig
from jaxtok.model import Llama, abstract_params, logical_axes_of


@dataclasses.dataclass(frozen=True)
class Transform:
    """How an HF tensor maps to ours; `hf_shape` derives the HF shape from ours so every tensor is checked."""

    to_ours: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


TRANSFORMS = {
    "same": Transform(lambda w, s: w, lambda w: w, lambda s: s),
    # Linear [out, in] <-> kernel [in, out]
    "transpose": Transform(lambda w, s: w.T, lambda w: w.T, lambda s: s[::-1]),
    # q/k/v_proj [X*H, D] <-> [D, X, H], X being N or K heads
    "split_out_heads": Transform(
        lambda w, s: w.reshape(s[1], s[2], s[0]).transpose(2, 0, 1),
        lambda w: w.transpose(1, 2, 0).reshape(-1, w.shape[0]),
        lambda s: (s[1] * s[2], s[0]),
    ),
    # o_proj [D, N*H] <-> [N, H, D]
    "split_in_heads": Transform(
        lambda w, s: w.reshape(s[2], s[0], s[1]).transpose(1, 2, 0),
        lambda w: w.transpose(2, 0, 1).reshape(w.shape[2], -1),
        lambda s: (s[2], s[0] * s[1]),
    ),
    # a bias [out features] <-> the projection's out_shape ([X, H] for q/k/v, [D] or [F] for the others)
    "flatten": Transform(lambda w, s: w.reshape(s), lambda w: w.reshape(-1), lambda s: (math.prod(s),)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; "{i}" is the layer index
    ours: tuple[str, ...]  # path in our parameter tree; a path under "layers" has a leading layers axis
    transform: str


TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed",), "same"),
    Rule("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "scale"), "same"),
    Rule("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q_proj", "kernel"), "split_out_heads"),
    Rule("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k_proj", "kernel"), "split_out_heads"),
    Rule("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v_proj", "kernel"), "split_out_heads"),
    Rule("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), "split_in_heads"),
    Rule("model.layers.{i}.self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), "same"),  # Qwen3
    Rule("model.layers.{i}.self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), "same"),  # Qwen3
    Rule("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), "same"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), "transpose"),
    Rule("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), "transpose"),
    Rule("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), "transpose"),
    Rule("model.norm.weight", ("final_norm", "scale"), "same"),
    Rule("lm_head.weight", ("lm_head",), "transpose"),  # untied heads only
)
# Each projection's bias, beside its weight: [out] <-> out_shape (configs with `biases` only).
TABLE += tuple(Rule(r.hf.removesuffix(".weight") + ".bias", r.ours[:-1] + ("bias",), "flatten")
               for r in TABLE if r.ours[-1] == "kernel")


def hf_module(ours: tuple[str, ...]) -> str:
    """The HF module whose weight the row for our parameter `ours` names ("{i}" for the layer), e.g.
    ("layers", "attn", "q_proj", "kernel") -> "model.layers.{i}.self_attn.q_proj": PEFT names its adapters after it."""
    return next(rule.hf for rule in TABLE if rule.ours == ours).removesuffix(".weight")


# Tensors some checkpoints carry that hold nothing to load: RoPE buffers of old conversions, and the copy of the
# embedding that some tied checkpoints also save as lm_head.weight.
IGNORED = re.compile(r"(.*\.rotary_emb\.inv_freq)$")

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def np_dtype(name: str):
    if name not in DTYPES:
        raise JaxtokError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_regex(name: str) -> str:
    """A regular expression for the HF name `name`, whose "{i}" captures the layer index."""
    return re.escape(name).replace(re.escape("{i}"), r"(\d+)")


def _compile(rule: Rule) -> re.Pattern:
    return re.compile(hf_regex(rule.hf) + "$")


_PATTERNS = [(_compile(rule), rule) for rule in TABLE]


def _match(name: str):
    for pattern, rule in _PATTERNS:
        m = pattern.match(name)
        if m:
            return rule, (int(m.group(1)) if m.groups() else None)
    return None, None


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _list(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_hf_params(model_dir: Path, model: Llama, allow_pickle: bool = False, shardings=None) -> dict:
    """Reads the checkpoint's weights into the `params` tree of `model`, cast to `model.param_dtype`.

    Tensors stream one at a time from the files straight into their device arrays (placed by `shardings`, a tree
    like the params, default: the default device): the host holds one tensor, each device only its shards and one
    layer in flight, never the whole model.
    """
    config = model.config
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(abstract_params(model)))
    dtype = np.dtype(model.param_dtype)
    expected = {
        rule.hf.format(i=i) for rule in TABLE for i in range(config.num_layers) if _path_exists(shapes, rule.ours)
    }
    buffers, seen = {}, set()
    unexpected = []
    for name, path, array in iter_tensors(weight_files(model_dir, allow_pickle)):
        rule, layer = _match(name)
        if rule is None or not _path_exists(shapes, rule.ours) or (layer is not None and layer >= config.num_layers):
            tied_copy = name == "lm_head.weight" and config.tie_word_embeddings
            if not (tied_copy or IGNORED.match(name)):
                unexpected.append(name)
            continue
        full_shape = _get(shapes, rule.ours)
        shape = full_shape[1:] if layer is not None else full_shape
        transform = TRANSFORMS[rule.transform]
        if tuple(array.shape) != tuple(transform.hf_shape(shape)):
            raise JaxtokError(
                f"tensor {name} in {path.name} has shape {list(array.shape)}, but config.json implies "
                f"{list(transform.hf_shape(shape))}"
            )
        value = transform.to_ours(array, shape).astype(dtype)
        sharding = _get(shardings, rule.ours) if shardings is not None else _default_sharding()
        if layer is None:
            buffers[rule.ours] = jax.device_put(value, sharding)
        else:
            if rule.ours not in buffers:
                buffers[rule.ours] = _zeros(full_shape, dtype, sharding)
            buffers[rule.ours] = _write_layer(sharding)(buffers[rule.ours], layer, value)
        seen.add(name)
    if unexpected:
        raise JaxtokError(f"checkpoint has tensors that a {config.architecture} of this config.json does not: "
                          f"{_list(unexpected)}")
    missing = sorted(expected - seen)
    if missing:
        raise JaxtokError(f"checkpoint lacks tensors: {_list(missing)}")
    params: dict = {}
    for path, array in buffers.items():
        _set(params, path, array)
    return params


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _zeros(shape, dtype, sharding) -> jax.Array:
    return _zeros_fn(tuple(shape), np.dtype(dtype), sharding)()


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    # cached: a fresh lambda per call would compile again for every stacked tensor
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _write_layer(sharding):
    """Writes one layer into a stacked array in place (donated), keeping the stacked array's sharding."""
    return jax.jit(lambda stacked, i, value: jax.lax.dynamic_update_index_in_dim(stacked, value, i, 0),
                   donate_argnums=0, out_shardings=sharding)


def _path_exists(tree: dict, path: tuple[str, ...]) -> bool:
    try:
        _get(tree, path)
        return True
    except KeyError:
        return False


def load_config(model_dir: Path) -> LlamaConfig:
    return LlamaConfig.from_hf(read_json(model_dir / "config.json", "model"))


def load_pretrained(
    path_or_id: str, dtype: str = "float32", compute_dtype: str | None = None, allow_pickle: bool = False,
    mesh=None, **model_kw
) -> tuple[Llama, dict]:
    """Loads an HF checkpoint of a family of `llama_config.FAMILIES`: returns the module and its frozen `params` tree
    (sharded over `mesh` if given).

    `dtype` is the dtype of the frozen weights; `compute_dtype` (default: the same) the dtype of activations.
    """
    model_dir = resolve_model_dir(path_or_id)
    config = load_config(model_dir)
    param_dtype = jnp.dtype(np_dtype(dtype))
    compute = jnp.dtype(np_dtype(compute_dtype or dtype))
    model = Llama(config, dtype=compute, param_dtype=param_dtype, **model_kw)
    shardings = None
    if mesh is not None:
        from jaxtok.sharding import tree_shardings

        shardings = tree_shardings(nn.unbox(abstract_params(model)), logical_axes_of(model)["params"], mesh)
    return model, load_hf_params(model_dir, model, allow_pickle, shardings)


def to_hf_tensors(params: dict, config: LlamaConfig, dtype=None) -> dict[str, np.ndarray]:
    """The table backwards: our `params` tree -> HF tensor name -> array (in `dtype`, default the params' own)."""
    tensors = {}
    for rule in TABLE:
        try:
            value = np.asarray(_get(params, rule.ours))
        except KeyError:
            continue  # lm_head of a tied model
        to_hf = TRANSFORMS[rule.transform].to_hf
        if "{i}" in rule.hf:
            for i in range(config.num_layers):
                tensors[rule.hf.format(i=i)] = to_hf(value[i])
        else:
            tensors[rule.hf] = to_hf(value)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}
