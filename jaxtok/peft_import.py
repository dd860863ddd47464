"""Reading a PEFT adapter into jaxtok, without torch: LoRA (with or without trainable tokens), or PEFT's standalone
trainable tokens (`TrainableTokensConfig`), which gives a model with `lora=None` and token rows.

    model, params = load_pretrained(BASE)
    model, adapters = load_peft_adapter(ADAPTER_DIR, model, params)
    logits, _ = model.apply({"params": params, **adapters}, tokens)

The adapters come back as the trainable tree (`lora` and `tokens` collections, float32), so training can go on
from them. An adapter whose tokenizer added tokens needs a base with that many rows first, as in PEFT, where the
user calls `resize_token_embeddings`: `resize_vocab(model, params, len(adapter_tokenizer))`.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxtok.errors import JaxtokError
from jaxtok.hf_io import read_json, resolve_model_dir
from jaxtok.model import Llama
from jaxtok.peft_format import check_shapes, from_peft, peft_type_of, read_adapter_config
from jaxtok.vocab import grow_vocab

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_peft_adapter(adapter_dir: str | os.PathLike, base_model: Llama, params: dict) -> tuple[Llama, dict]:
    """(model with the adapter's LoRA config (None for a trainable-tokens adapter) and token rows, adapters
    {"lora": ..., "tokens": ...}).

    `adapter_dir` is a directory PEFT's `save_pretrained` wrote (or a Hub id); `base_model` and `params` are the base
    it was trained on, as `load_pretrained` returns them. Features jaxtok does not compute are refused by name.
    """
    directory = resolve_model_dir(adapter_dir, "adapter")
    config = read_json(directory / ADAPTER_CONFIG, "PEFT adapter")
    lora, rows = read_adapter_config(config, base_model.config)
    vocab_rows = np.shape(params["embed"])[0]
    if vocab_rows != base_model.config.vocab_size:
        raise JaxtokError(f"params hold {vocab_rows} embedding rows but the model's config says "
                          f"{base_model.config.vocab_size}; pass the params that belong to base_model")
    model = base_model.clone(lora=lora, token_rows=rows)
    c = base_model.config
    adapters = from_peft(_read_tensors(directory), c.num_layers, peft_type_of(model), c.tie_word_embeddings)
    check_shapes(adapters, model)
    return model, {name: _to_jax(tree) for name, tree in adapters.items()}


def resize_vocab(model: Llama, params: dict, vocab_size: int) -> tuple[Llama, dict]:
    """The base grown to `vocab_size` rows, like transformers' `resize_token_embeddings`, for an adapter that adds
    tokens. New rows are the mean of the old ones; an adapter that adds tokens replaces them with its own rows."""
    config = model.config
    if vocab_size < config.vocab_size:
        raise JaxtokError(f"cannot shrink the vocabulary from {config.vocab_size} to {vocab_size} rows")
    if vocab_size == config.vocab_size:
        return model, params
    params, config = grow_vocab(params, config, vocab_size, range(config.vocab_size, vocab_size))
    return model.clone(config=config), params


def _read_tensors(directory) -> dict[str, np.ndarray]:
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise JaxtokError(f"{directory} holds a pickled adapter_model.bin, which can run code when loaded; "
                              "re-save the adapter with safetensors (PEFT's default)")
        raise JaxtokError(f"{directory} has no {ADAPTER_WEIGHTS}; is it a PEFT adapter directory?")
    try:
        with safe_open(str(path), framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise JaxtokError(f"{path} is not a readable safetensors file ({e})") from None


def _to_jax(tree):
    if isinstance(tree, dict):
        return {k: _to_jax(v) for k, v in tree.items()}
    return jnp.asarray(tree, jnp.float32)


def apply_adapter(adapter_dir, base_model: Llama, params: dict, base_tokenizer) -> tuple[Llama, dict, dict, Any]:
    """(model, params, adapters, tokenizer) for evaluating `adapter_dir` on a base: the adapter's own tokenizer when
    it ships one (tokens were added), with the base grown to that tokenizer's size first, as PEFT users do."""
    from jaxtok.tokenizer import load_tokenizer

    directory = resolve_model_dir(adapter_dir, "adapter")
    tokenizer = base_tokenizer
    if any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(str(directory))
    base_model, params = resize_vocab(base_model, params, max(base_model.config.vocab_size, len(tokenizer)))
    model, adapters = load_peft_adapter(directory, base_model, params)
    return model, params, adapters, tokenizer
