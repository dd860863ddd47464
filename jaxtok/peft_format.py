"""jaxtok adapters <-> PEFT's adapter format: tensor names (as `save_pretrained` writes them, adapter name stripped)
and `adapter_config.json`.

Our LoRA matrices already have PEFT's layouts (A [R, in], B [out, R]); only the stacked layer axis is split into
per-layer tensors. Token tables are PEFT's `trainable_tokens_delta` as they are (full rows, not differences).

    lora/layers/attn/q_proj/a [L, R, D]  <->  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
    tokens/embed [K, D]                  <->  base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta
    tokens/head  [K, D]                  <->  base_model.model.lm_head.token_adapter.trainable_tokens_delta

Config: `LoraConfig` <-> r, lora_alpha, lora_dropout, use_rslora, target_modules; `TokenRows` <->
trainable_token_indices, a list (embedding, and a tied head with it) or {"embed_tokens": [...], "lm_head": [...]}
when an untied head trains rows of its own. Everything else PEFT can express but jaxtok cannot compute is refused
by name on import rather than silently dropped.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxtok.errors import JaxtokError
from jaxtok.llama_config import LlamaConfig
from jaxtok.lora import DEFAULT_TARGETS, TARGETS, LoraConfig
from jaxtok.model import Llama
from jaxtok.tokens import TokenRows

PREFIX = "base_model.model."
_BLOCKS = {"attn": "self_attn", "mlp": "mlp"}
_MATRICES = {"a": "lora_A", "b": "lora_B"}
BLOCK_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TOKEN_TENSORS = {
    "embed": PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta",
    "head": PREFIX + "lm_head.token_adapter.trainable_tokens_delta",
}
_LORA_NAME = re.compile(
    re.escape(PREFIX) + r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(lora_A|lora_B)\.weight$"
)
# Whole embedding or head matrices: what `save_embedding_layers` (on by default once the vocabulary was resized)
# adds to an adapter. jaxtok keeps the base frozen, so it cannot take them.
_FULL_MATRIX = re.compile(r".*(embed_tokens|lm_head)(\.token_adapter)?(\.base_layer)?\.weight$")


def to_peft(adapters: dict) -> dict[str, np.ndarray]:
    """PEFT tensor name -> float32 array, for the `lora` and `tokens` collections of `adapters`."""
    tensors = {}
    for block, modules in adapters.get("lora", {}).get("layers", {}).items():
        for module, matrices in modules.items():
            for matrix, stacked in matrices.items():
                stacked = np.asarray(stacked, np.float32)
                for i in range(stacked.shape[0]):
                    name = f"{PREFIX}model.layers.{i}.{_BLOCKS[block]}.{module}.{_MATRICES[matrix]}.weight"
                    tensors[name] = stacked[i]
    for table, rows in adapters.get("tokens", {}).items():
        tensors[TOKEN_TENSORS[table]] = np.asarray(rows, np.float32)
    return tensors


def from_peft(tensors: dict[str, np.ndarray], num_layers: int) -> dict:
    """The inverse of `to_peft`: PEFT tensors -> {"lora": ..., "tokens": ...} with layers stacked, float32."""
    per_layer: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
    adapters: dict = {}
    blocks = {v: k for k, v in _BLOCKS.items()}
    matrices = {v: k for k, v in _MATRICES.items()}
    for name, array in tensors.items():
        table = next((t for t, n in TOKEN_TENSORS.items() if name == n), None)
        if table is not None:
            adapters.setdefault("tokens", {})[table] = np.asarray(array, np.float32)
            continue
        if _FULL_MATRIX.match(name):
            raise JaxtokError(
                f"adapter carries the full matrix {name} (saved with save_embedding_layers); jaxtok trains token rows "
                "only: re-save it with save_pretrained(..., save_embedding_layers=False)"
            )
        m = _LORA_NAME.match(name)
        if m is None:
            raise JaxtokError(f"adapter tensor {name} is not a LoRA matrix or token table that jaxtok supports")
        layer, block, module, matrix = int(m.group(1)), blocks[m.group(2)], m.group(3), matrices[m.group(4)]
        if BLOCK_OF.get(module) != block:
            raise JaxtokError(f"adapter tensor {name} names a module a Llama does not have")
        if layer >= num_layers:
            raise JaxtokError(f"adapter tensor {name} is for layer {layer}, but the base has {num_layers} layers")
        per_layer.setdefault((block, module, matrix), {})[layer] = np.asarray(array, np.float32)
    for (block, module, matrix), layers in per_layer.items():
        if len(layers) != num_layers:
            missing = sorted(set(range(num_layers)) - set(layers))
            raise JaxtokError(f"adapter has {module}.{_MATRICES[matrix]} for some layers only (missing {missing}); "
                              "jaxtok applies LoRA to every layer")
        shapes = {layers[i].shape for i in range(num_layers)}
        if len(shapes) != 1:
            raise JaxtokError(f"adapter's {module}.{_MATRICES[matrix]} differs in shape between layers "
                              f"({sorted(shapes)}); jaxtok needs one rank for every layer")
        stacked = np.stack([layers[i] for i in range(num_layers)])
        adapters.setdefault("lora", {}).setdefault("layers", {}).setdefault(block, {}).setdefault(module, {})[
            matrix
        ] = stacked
    return adapters


def lora_shapes(config: LlamaConfig, lora: LoraConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """module -> {"a": [L, R, in], "b": [L, out, R]}: the stacked shapes of each targeted module's matrices."""
    D, F, L, R = config.hidden_size, config.intermediate_size, config.num_layers, lora.rank
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    in_out = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
              "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    return {m: {"a": (L, R, in_out[m][0]), "b": (L, in_out[m][1], R)} for m in lora.targets}


# ----------------------------------------------------------------------------------------------- adapter_config.json


def adapter_config(model: Llama, base_model: str) -> dict:
    """`adapter_config.json` as PEFT writes it for `model.lora` and `model.token_rows` (keys known since PEFT 0.15,
    so older releases read it without warnings)."""
    lora, rows = model.lora, model.token_rows
    if lora is None:
        raise JaxtokError("PEFT's LoRA format needs at least one LoRA target module; train with LoRA, or export "
                          "a merged checkpoint instead")
    if rows.head_ids:
        # dict form: PEFT wraps the head with a table of its own only when it is named.
        token_indices: Any = {"lm_head": list(rows.head_ids)}
        if rows.embed_ids:
            token_indices = {"embed_tokens": list(rows.embed_ids), **token_indices}
    else:
        token_indices = list(rows.embed_ids) or None
    alpha = lora.alpha
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,  # PEFT types it int; it writes 16, not 16.0
        "lora_bias": False,
        "lora_dropout": lora.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": lora.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(lora.targets),
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": token_indices,
        "use_dora": False,
        "use_rslora": lora.rslora,
    }


# Keys read here, and keys that are harmless whatever their value (metadata, or settings of init methods that only
# matter while PEFT creates a fresh adapter). Any other key set to something other than null/false/{}/[] is a
# feature jaxtok does not compute, and is refused by name.
_READ = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
         "trainable_token_indices", "bias", "init_lora_weights"}
_HARMLESS = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
             "layers_pattern", "megatron_core", "megatron_config", "loftq_config", "eva_config", "corda_config",
             "lora_ga_config", "qalora_group_size", "ensure_weight_tying"}
# init_lora_weights values that only choose the starting A and B; the others rewrite the base weights
# (pissa, olora, corda, loftq) or change the forward pass (mica), so the adapter means nothing on the plain base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def read_adapter_config(config: dict, base: LlamaConfig) -> tuple[LoraConfig, TokenRows]:
    """The `LoraConfig` and `TokenRows` an `adapter_config.json` describes for a base with config `base`."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise JaxtokError(f"adapter_config.json has peft_type {peft_type!r}; jaxtok reads LoRA adapters "
                          "(peft_type \"LORA\") only")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise JaxtokError(f"adapter_config.json has task_type {task!r}; jaxtok loads causal LM adapters (CAUSAL_LM)")
    for key, value in config.items():
        if key not in _READ and key not in _HARMLESS and value not in (None, False, {}, [], ""):
            raise JaxtokError(f"adapter_config.json sets {key}={value!r}, which jaxtok does not support; "
                              "use an adapter trained without it")
    if config.get("bias", "none") != "none":
        raise JaxtokError(f"adapter_config.json sets bias={config['bias']!r}, which jaxtok does not support; "
                          "use an adapter trained with bias='none'")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise JaxtokError(f"adapter_config.json sets init_lora_weights={init!r}, which changes the base model; "
                          "convert the adapter to plain LoRA in PEFT first")
    try:
        lora = LoraConfig(
            rank=config.get("r", 8),
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
            targets=_targets(config.get("target_modules")),
            rslora=bool(config.get("use_rslora", False)),
        )
    except (TypeError, ValueError):
        raise JaxtokError("adapter_config.json has a non-numeric r, lora_alpha or lora_dropout") from None
    return lora, _token_rows(config.get("trainable_token_indices"), base)


def _targets(target_modules) -> tuple[str, ...]:
    if target_modules is None:
        return DEFAULT_TARGETS  # what PEFT picks for Llama when none are named
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return TARGETS
        raise JaxtokError(f"adapter_config.json gives target_modules as the pattern {target_modules!r}; jaxtok "
                          "reads a list of module names or 'all-linear'")
    # PEFT matches list entries as name suffixes, so "self_attn.q_proj" means q_proj. An entry naming single
    # layers maps to its module here; the tensors then miss the other layers and are refused.
    targets = []
    for entry in target_modules:
        module = str(entry).rsplit(".", 1)[-1]
        if module not in TARGETS:
            raise JaxtokError(f"adapter_config.json targets {entry!r}; jaxtok applies LoRA to "
                              f"{', '.join(TARGETS)} only")
        targets.append(module)
    if not targets:
        raise JaxtokError("adapter_config.json has an empty target_modules list; a LoRA adapter needs targets")
    return tuple(targets)


def _token_rows(indices, base: LlamaConfig) -> TokenRows:
    if indices is None:
        return TokenRows()
    if isinstance(indices, list):
        rows = TokenRows(tuple(indices), ())
    elif isinstance(indices, dict):
        layers: dict[str, tuple[int, ...]] = {}
        for key, ids in indices.items():
            # PEFT finds the layer by name suffix: "embed_tokens" and "model.embed_tokens" are the same layer.
            layer = {"embed_tokens": "embed", "lm_head": "head"}.get(str(key).rsplit(".", 1)[-1])
            if layer is None:
                raise JaxtokError(f"trainable_token_indices names the layer {key!r}; jaxtok trains rows of "
                                  "embed_tokens and lm_head only")
            layers[layer] = tuple(ids)
        embed_ids, head_ids = layers.get("embed", ()), layers.get("head", ())
        if base.tie_word_embeddings and head_ids:
            # PEFT ties the head's table to the embedding's when both name the same ids; otherwise the tied
            # matrix would hold two different rows per token, which jaxtok cannot compute.
            if head_ids != embed_ids:
                raise JaxtokError("trainable_token_indices gives the tied lm_head other ids than embed_tokens; "
                                  "jaxtok trains a tied head's rows with the embedding's (use one list)")
            head_ids = ()
        rows = TokenRows(embed_ids, head_ids)
    else:
        raise JaxtokError(f"trainable_token_indices must be a list or a dict of lists (got {indices!r})")
    for ids in (rows.embed_ids, rows.head_ids):
        for i in ids:
            if i >= base.vocab_size:
                raise JaxtokError(
                    f"adapter trains token id {i}, but the base has {base.vocab_size} rows; it adds tokens: grow the "
                    "base first with jaxtok.peft_import.resize_vocab(model, params, len(adapter_tokenizer))"
                )
    rows.validate(base.vocab_size, base.tie_word_embeddings)
    return rows


def check_shapes(adapters: dict, model: Llama) -> None:
    """Every targeted module has A and B of the right shapes for every layer, nothing else is there, and the token
    tables have one row per id."""
    c = model.config
    expected = lora_shapes(c, model.lora) if model.lora else {}
    found = {m: ab for modules in adapters.get("lora", {}).get("layers", {}).values() for m, ab in modules.items()}
    for module in sorted(set(found) - set(expected)):
        raise JaxtokError(f"adapter has LoRA weights for {module}, which adapter_config.json does not target")
    for module, shapes in expected.items():
        for matrix, shape in shapes.items():
            array = found.get(module, {}).get(matrix)
            name = f"{module}.{_MATRICES[matrix]}"
            if array is None:
                raise JaxtokError(f"adapter_model.safetensors lacks {name}, which adapter_config.json targets")
            if tuple(array.shape) != shape:
                raise JaxtokError(f"adapter's {name} has shape {list(array.shape[1:])} per layer, but r and the base's "
                                  f"config.json imply {list(shape[1:])}")
    tables = adapters.get("tokens", {})
    for table, ids in (("embed", model.token_rows.embed_ids), ("head", model.token_rows.head_ids)):
        name = TOKEN_TENSORS[table]
        if not ids:
            if table in tables:
                raise JaxtokError(f"adapter has {name}, but adapter_config.json names no token ids for it")
            continue
        if table not in tables:
            raise JaxtokError(f"adapter_model.safetensors lacks {name}, which trainable_token_indices implies")
        if tuple(tables[table].shape) != (len(ids), c.hidden_size):
            raise JaxtokError(f"{name} has shape {list(tables[table].shape)}, but {len(ids)} ids and hidden size "
                              f"{c.hidden_size} imply {[len(ids), c.hidden_size]}")
