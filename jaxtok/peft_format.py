"""jaxtok adapters <-> PEFT's adapter format: tensor names (as `save_pretrained` writes them, adapter name stripped)
and `adapter_config.json`.

Our LoRA matrices already have PEFT's layouts (A [R, I], B [O, R]); only the stacked layer axis is split into
per-layer tensors. Token tables are PEFT's `trainable_tokens_delta` as they are (full rows, not differences).
Module names come from `convert.TABLE` (PEFT names an adapter after the module it adapts), LoRA shapes from the
model's own variables.

    lora/layers/attn/q_proj/a [L, R, D]  <->  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
    tokens/embed [M, D]                  <->  base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta
    tokens/head  [M, D]                  <->  base_model.model.lm_head.token_adapter.trainable_tokens_delta

Two adapter types:
* "LORA" (a model with `lora`): `LoraConfig` <-> r, lora_alpha, lora_dropout, use_rslora, target_modules;
  `TokenRows` <-> trainable_token_indices, a list (embedding, and a tied head with it) or
  {"embed_tokens": [...], "lm_head": [...]} when an untied head trains rows of its own.
* "TRAINABLE_TOKENS" (PEFT's standalone `TrainableTokensConfig`; a model with `lora=None` and token rows): one
  `token_indices` list for every layer in `target_modules` (embed_tokens, lm_head). The tables are not wrapped in a
  `token_adapter` (`...embed_tokens.trainable_tokens_delta`), and a tied lm_head saves the embedding's table a second
  time under its own name. An untied head therefore trains the embedding's ids, or rows of its own with no embedding
  rows, or none.
Everything else PEFT can express but jaxtok cannot compute is refused by name on import rather than silently dropped.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import numpy as np

from jaxtok.convert import hf_module, hf_regex
from jaxtok.errors import JaxtokError
from jaxtok.llama_config import PROJECTIONS, LlamaConfig
from jaxtok.lora import DEFAULT_TARGETS, TARGETS, LoraConfig
from jaxtok.model import Llama, abstract_variables
from jaxtok.tokens import TokenRows

PREFIX = "base_model.model."
_MATRICES = {"a": "lora_A", "b": "lora_B"}
# Our (block, module) -> the HF module whose LoRA matrices PEFT names after it ("{i}" is the layer).
LORA_MODULES = {(block, module): hf_module(("layers", block, module, "kernel"))
                for block, modules in PROJECTIONS.items() for module in modules}
LORA, TRAINABLE_TOKENS = "LORA", "TRAINABLE_TOKENS"  # the peft_type values jaxtok reads and writes
# The layers that hold token tables, by their module names in transformers' LlamaForCausalLM.
TOKEN_LAYERS = {"embed": hf_module(("embed",)), "head": hf_module(("lm_head",))}


def token_tensor_names(peft_type: str = LORA) -> dict[str, str]:
    """table ("embed", "head") -> PEFT's tensor name: LoRA wraps the table in a `token_adapter`, the standalone
    TRAINABLE_TOKENS method puts it on the layer itself."""
    wrapper = ".token_adapter" if peft_type == LORA else ""
    return {table: f"{PREFIX}{layer}{wrapper}.trainable_tokens_delta" for table, layer in TOKEN_LAYERS.items()}


TOKEN_TENSORS = token_tensor_names(LORA)


def peft_type_of(model: Llama) -> str:
    """The adapter type `model` exports as: LoRA (with any token rows), or trainable tokens alone."""
    return LORA if model.lora is not None else TRAINABLE_TOKENS


_LORA_TENSORS = {re.compile(re.escape(PREFIX) + hf_regex(hf) + r"\.(lora_A|lora_B)\.weight$"): target
                 for target, hf in LORA_MODULES.items()}
# LoRA on a projection that its block lacks (mlp.q_proj) is refused as such, not as an unknown kind of tensor.
_MISPLACED = [re.compile(re.escape(PREFIX) + hf_regex(block) + r"\.\w+_proj\.(lora_A|lora_B)\.weight$")
              for block in dict.fromkeys(hf.rsplit(".", 1)[0] for hf in LORA_MODULES.values())]
# Whole embedding or head matrices: what `save_embedding_layers` (on by default once the vocabulary was resized)
# adds to an adapter. jaxtok keeps the base frozen, so it cannot take them.
_FULL_MATRIX = re.compile(r".*(embed_tokens|lm_head)(\.token_adapter)?(\.base_layer)?\.weight$")


def to_peft(adapters: dict, peft_type: str = LORA, tied: bool = False) -> dict[str, np.ndarray]:
    """PEFT tensor name -> float32 array, for the `lora` and `tokens` collections of `adapters`, named as an adapter of
    `peft_type` names them; `tied`: the base ties its head to the embedding."""
    tensors = {}
    names = token_tensor_names(peft_type)
    for block, modules in adapters.get("lora", {}).get("layers", {}).items():
        for module, matrices in modules.items():
            for matrix, stacked in matrices.items():
                stacked = np.asarray(stacked, np.float32)
                name = f"{PREFIX}{LORA_MODULES[block, module]}.{_MATRICES[matrix]}.weight"
                for i in range(stacked.shape[0]):
                    tensors[name.format(i=i)] = stacked[i]
    for table, rows in adapters.get("tokens", {}).items():
        tensors[names[table]] = np.asarray(rows, np.float32)
    if peft_type == TRAINABLE_TOKENS and tied and "embed" in adapters.get("tokens", {}):
        # PEFT's tied lm_head shares the embedding's table, and its state dict holds it under the head's name too
        tensors[names["head"]] = tensors[names["embed"]].copy()
    return tensors


def from_peft(tensors: dict[str, np.ndarray], num_layers: int, peft_type: str = LORA, tied: bool = False) -> dict:
    """The inverse of `to_peft`: PEFT tensors -> {"lora": ..., "tokens": ...} with layers stacked, float32."""
    per_layer: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
    adapters: dict = {}
    matrices = {v: k for k, v in _MATRICES.items()}
    names = token_tensor_names(peft_type)
    for name, array in tensors.items():
        table = next((t for t, n in names.items() if name == n), None)
        if table is not None:
            adapters.setdefault("tokens", {})[table] = np.asarray(array, np.float32)
            continue
        if _FULL_MATRIX.match(name):
            raise JaxtokError(
                f"adapter carries the full matrix {name} (saved with save_embedding_layers); jaxtok trains token rows "
                "only: re-save it with save_pretrained(..., save_embedding_layers=False)"
            )
        for pattern, (block, module) in _LORA_TENSORS.items():  # noqa: B007 (used after the break)
            if m := pattern.match(name):
                break
        else:
            if any(pattern.match(name) for pattern in _MISPLACED):
                raise JaxtokError(f"adapter tensor {name} names a module a Llama does not have")
            raise JaxtokError(f"adapter tensor {name} is not a LoRA matrix or token table that jaxtok supports")
        layer, matrix = int(m.group(1)), matrices[m.group(2)]
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
    tables = adapters.get("tokens", {})
    if peft_type == TRAINABLE_TOKENS and tied and "head" in tables:
        # the tied head's copy of the embedding's table (PEFT loads both names into one shared tensor)
        head = tables.pop("head")
        if not np.array_equal(tables.setdefault("embed", head), head):
            raise JaxtokError(f"{names['head']} differs from {names['embed']}, but the base ties its head to the "
                              "embedding, so PEFT would load one of them for both; keep the embedding's table only")
    return adapters


def lora_shapes(config: LlamaConfig, lora: LoraConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """module -> {"a": [L, R, I], "b": [L, O, R]}: the stacked shapes of each targeted module's matrices, as the
    model declares them (traced, nothing allocated), in the order of `lora.targets`."""
    blocks = nn.unbox(abstract_variables(Llama(config, lora=lora)))["lora"]["layers"]
    shapes = {module: {matrix: tuple(v.shape) for matrix, v in matrices.items()}
              for modules in blocks.values() for module, matrices in modules.items()}
    return {module: shapes[module] for module in lora.targets}


# ----------------------------------------------------------------------------------------------- adapter_config.json


def adapter_config(model: Llama, base_model: str) -> dict:
    """`adapter_config.json` as PEFT writes it for `model.lora` and `model.token_rows` (keys known since PEFT 0.15,
    so older releases read it without warnings): a LoRA adapter, or with `lora=None` a TRAINABLE_TOKENS one."""
    lora, rows = model.lora, model.token_rows
    if lora is None:
        return _trainable_tokens_config(model, base_model)
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


def standalone_targets(rows: TokenRows) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(target_modules, token_indices) of the TRAINABLE_TOKENS adapter for `rows`: PEFT gives every targeted layer
    the same list of ids. (A tied head is no target of its own: PEFT ties its table to the embedding's.)"""
    targeted = {table: ids for table, ids in (("embed", rows.embed_ids), ("head", rows.head_ids)) if ids}
    if not targeted:
        raise JaxtokError("the model has neither LoRA nor token rows, so there is no adapter to export; train LoRA "
                          "or token rows, or export a merged checkpoint instead")
    if len(set(targeted.values())) > 1:
        raise JaxtokError(f"PEFT's TrainableTokensConfig has one token_indices list for every layer, but the untied "
                          f"head trains rows {list(rows.head_ids)} and the embedding {list(rows.embed_ids)}; train "
                          "the same ids in both (tokens.train_head=all), or add LoRA (its adapters name one list "
                          "per layer), or export a merged checkpoint")
    modules = tuple(TOKEN_LAYERS[table].rsplit(".", 1)[-1] for table in targeted)  # PEFT matches name suffixes
    return modules, next(iter(targeted.values()))


def _trainable_tokens_config(model: Llama, base_model: str) -> dict:
    target_modules, token_indices = standalone_targets(model.token_rows)
    return {
        # with no task_type, AutoPeftModelForCausalLM finds the base model's class here
        "auto_mapping": {"base_model_class": model.config.architecture,
                         "parent_library": f"transformers.models.{model.config.model_type}.modeling_"
                                           f"{model.config.model_type}"},
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_weights": True,
        "peft_type": TRAINABLE_TOKENS,
        "revision": None,
        "target_modules": list(target_modules),
        "task_type": None,
        "token_indices": list(token_indices),
    }


# Keys read here, and keys that are harmless whatever their value (metadata, or settings of init methods that only
# matter while PEFT creates a fresh adapter). Any other key set to something other than null/false/{}/[] is a
# feature jaxtok does not compute, and is refused by name.
_READ = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
         "trainable_token_indices", "bias", "init_lora_weights"}
# TRAINABLE_TOKENS: init_weights only chose the tables' starting values
_READ_TOKENS = {"peft_type", "task_type", "token_indices", "target_modules", "init_weights"}
_HARMLESS = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
             "layers_pattern", "megatron_core", "megatron_config", "loftq_config", "eva_config", "corda_config",
             "lora_ga_config", "qalora_group_size", "ensure_weight_tying"}
# init_lora_weights values that only choose the starting A and B; the others rewrite the base weights
# (pissa, olora, corda, loftq) or change the forward pass (mica), so the adapter means nothing on the plain base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def read_adapter_config(config: dict, base: LlamaConfig) -> tuple[Optional[LoraConfig], TokenRows]:
    """The `LoraConfig` and `TokenRows` an `adapter_config.json` describes for a base with config `base`; the
    `LoraConfig` is None for PEFT's standalone trainable tokens (peft_type TRAINABLE_TOKENS)."""
    peft_type = config.get("peft_type")
    if peft_type not in (LORA, TRAINABLE_TOKENS):
        raise JaxtokError(f"adapter_config.json has peft_type {peft_type!r}; jaxtok reads LoRA (\"LORA\") and "
                          "trainable-tokens (\"TRAINABLE_TOKENS\") adapters only")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise JaxtokError(f"adapter_config.json has task_type {task!r}; jaxtok loads causal LM adapters (CAUSAL_LM)")
    read = _READ if peft_type == LORA else _READ_TOKENS
    for key, value in config.items():
        if key not in read and key not in _HARMLESS and value not in (None, False, {}, [], ""):
            raise JaxtokError(f"adapter_config.json sets {key}={value!r}, which jaxtok does not support; "
                              "use an adapter trained without it")
    if peft_type == TRAINABLE_TOKENS:
        return None, _standalone_rows(config, base)
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


def _standalone_rows(config: dict, base: LlamaConfig) -> TokenRows:
    """TRAINABLE_TOKENS: the one `token_indices` list, for every layer `target_modules` names."""
    ids = config.get("token_indices")
    if not isinstance(ids, list) or not ids:
        raise JaxtokError(f"adapter_config.json has token_indices={ids!r}; a trainable-tokens adapter needs a "
                          "non-empty list of token ids")
    tables = _token_targets(config.get("target_modules"), base.num_layers)
    if base.tie_word_embeddings and "head" in tables:
        # PEFT gives a tied head the embedding's table by itself; naming lm_head too either trains head rows apart
        # from the tied embedding's, or (both named) gives a model PEFT 0.21 cannot run
        raise JaxtokError("adapter_config.json targets lm_head, but the base ties its head to the embedding; jaxtok "
                          "trains a tied head's rows with the embedding's (target embed_tokens only)")
    rows = tuple(ids)
    return _checked_rows(TokenRows(rows if "embed" in tables else (), rows if "head" in tables else ()), base)


def _token_targets(target_modules, num_layers: int) -> set[str]:
    """The tables ("embed", "head") whose layers `target_modules` names, matched as PEFT matches them: a string is a
    regular expression for whole module names, a list entry a module name or a suffix of one."""
    if target_modules is None:
        return {"embed"}  # PEFT then targets the input embedding
    if isinstance(target_modules, str):
        entries = [target_modules]

        def matches(entry: str, name: str) -> bool:
            try:
                return re.fullmatch(entry, name) is not None
            except re.error:
                raise JaxtokError(f"adapter_config.json has target_modules={entry!r}, which is not a valid regular "
                                  "expression") from None
    else:
        entries = [str(entry) for entry in target_modules]

        def matches(entry: str, name: str) -> bool:
            return name == entry or name.endswith("." + entry)

    if not entries:
        raise JaxtokError("adapter_config.json has an empty target_modules list; name embed_tokens or lm_head")
    layers = {name: table for table, name in TOKEN_LAYERS.items()}
    tables: set[str] = set()
    for entry in entries:
        hits = [name for name in _hf_module_names(num_layers) if matches(entry, name)]
        other = [name for name in hits if name not in layers]
        if other:
            raise JaxtokError(f"adapter_config.json targets {entry!r}, which matches {other[0]}; jaxtok trains token "
                              "rows of embed_tokens and lm_head only")
        if not hits:
            raise JaxtokError(f"adapter_config.json targets {entry!r}, which names no module of a Llama; jaxtok "
                              "trains token rows of embed_tokens and lm_head")
        tables.update(layers[name] for name in hits)
    return tables


def _hf_module_names(num_layers: int) -> list[str]:
    """The module names of transformers' LlamaForCausalLM (the ones PEFT matches target_modules against)."""
    names = ["model", "model.layers", "model.norm", "model.rotary_emb", *TOKEN_LAYERS.values()]
    for i in range(num_layers):
        layer = f"model.layers.{i}"
        names += [layer, f"{layer}.self_attn", f"{layer}.mlp", f"{layer}.mlp.act_fn", f"{layer}.input_layernorm",
                  f"{layer}.post_attention_layernorm"]
        names += [hf.format(i=i) for hf in LORA_MODULES.values()]
    return names


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
    return _checked_rows(rows, base)


def _checked_rows(rows: TokenRows, base: LlamaConfig) -> TokenRows:
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
    tables, names = adapters.get("tokens", {}), token_tensor_names(peft_type_of(model))
    keys = "trainable_token_indices" if model.lora is not None else "token_indices with target_modules"
    for table, ids in (("embed", model.token_rows.embed_ids), ("head", model.token_rows.head_ids)):
        name = names[table]
        if not ids:
            if table in tables:
                raise JaxtokError(f"adapter has {name}, but adapter_config.json names no token ids for it")
            continue
        if table not in tables:
            raise JaxtokError(f"adapter_model.safetensors lacks {name}, which {keys} implies")
        if tuple(tables[table].shape) != (len(ids), c.hidden_size):
            raise JaxtokError(f"{name} has shape {list(tables[table].shape)}, but {len(ids)} ids and hidden size "
                              f"{c.hidden_size} imply {[len(ids), c.hidden_size]}")


def modules_to_save(config: dict, params: dict, tied: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """`config` with PEFT's `modules_to_save` for the whole embedding (and an untied head), and their tensors, float32
    in torch's [vocab, hidden] layout, named as PEFT saves them. A tied head gets `ensure_weight_tying`, so PEFT ties
    it to the trained embedding (without it the head would keep the base's matrix), and is saved as PEFT saves it: a
    second copy under the head's name."""
    embed = np.asarray(params["embed"], np.float32)
    head = embed if tied else np.asarray(params["lm_head"], np.float32).T
    modules = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    config = {**config, "modules_to_save": modules, "ensure_weight_tying": tied}
    tensors = {f"{PREFIX}{TOKEN_LAYERS['embed']}.weight": embed,
               f"{PREFIX}{TOKEN_LAYERS['head']}.weight": np.ascontiguousarray(head)}
    return config, tensors
