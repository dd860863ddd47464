"""jaxtok adapters <-> PEFT's tensor names (as `save_pretrained` writes them, adapter name stripped).

Our LoRA matrices already have PEFT's layouts (A [R, in], B [out, R]); only the stacked layer axis is split into
per-layer tensors. Token tables are PEFT's `trainable_tokens_delta` as they are (full rows, not differences).

    lora/layers/attn/q_proj/a [L, R, D]  <->  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
    tokens/embed [K, D]                  <->  base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta
    tokens/head  [K, D]                  <->  base_model.model.lm_head.token_adapter.trainable_tokens_delta
"""

from __future__ import annotations

import re

import numpy as np

from jaxtok.errors import JaxtokError

PREFIX = "base_model.model."
_BLOCKS = {"attn": "self_attn", "mlp": "mlp"}
_MATRICES = {"a": "lora_A", "b": "lora_B"}
TOKEN_TENSORS = {
    "embed": PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta",
    "head": PREFIX + "lm_head.token_adapter.trainable_tokens_delta",
}
_LORA_NAME = re.compile(
    re.escape(PREFIX) + r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(lora_A|lora_B)\.weight$"
)


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
    """The inverse of `to_peft`: PEFT tensors -> {"lora": ..., "tokens": ...} with layers stacked."""
    per_layer: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
    adapters: dict = {}
    blocks = {v: k for k, v in _BLOCKS.items()}
    matrices = {v: k for k, v in _MATRICES.items()}
    for name, array in tensors.items():
        table = next((t for t, n in TOKEN_TENSORS.items() if name == n), None)
        if table is not None:
            adapters.setdefault("tokens", {})[table] = np.asarray(array, np.float32)
            continue
        m = _LORA_NAME.match(name)
        if m is None:
            raise JaxtokError(f"adapter tensor {name} is not a LoRA matrix or token table that jaxtok supports")
        layer, block, module, matrix = int(m.group(1)), blocks[m.group(2)], m.group(3), matrices[m.group(4)]
        per_layer.setdefault((block, module, matrix), {})[layer] = np.asarray(array, np.float32)
    for (block, module, matrix), layers in per_layer.items():
        if sorted(layers) != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(layers))
            raise JaxtokError(f"adapter has {module}.{_MATRICES[matrix]} for some layers only (missing {missing})")
        stacked = np.stack([layers[i] for i in range(num_layers)])
        adapters.setdefault("lora", {}).setdefault("layers", {}).setdefault(block, {}).setdefault(module, {})[
            matrix
        ] = stacked
    return adapters
