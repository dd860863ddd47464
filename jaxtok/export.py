"""Exports to the PyTorch ecosystem: a PEFT adapter directory and a merged Hugging Face checkpoint.

Both are written atomically (see `atomic`). The adapter holds float32 LoRA matrices and token tables under PEFT's
names (`peft_format`) with an `adapter_config.json` PEFT reads as it is; the merged checkpoint is the base with the
adapters folded in (`merge`), written through the conversion table backwards, sharded above `max_shard_bytes`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.numpy import save_file

from jaxtok.atomic import atomic_directory
from jaxtok.convert import np_dtype, to_hf_tensors
from jaxtok.llama_config import LlamaConfig
from jaxtok.merge import merge_adapters
from jaxtok.model import Llama
from jaxtok.peft_format import to_peft

SAFETENSORS_METADATA = {"format": "pt"}


def hf_config(config: LlamaConfig, dtype: str, bos_token_id=None, eos_token_id=None) -> dict:
    """config.json for `LlamaForCausalLM` in the transformers-4 spelling, which transformers 4 and 5 both read."""
    rope = config.rope
    rope_scaling = None
    if rope.type != "default":
        rope_scaling = {"rope_type": rope.type, "factor": rope.factor}
        if rope.type == "llama3":
            rope_scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                                original_max_position_embeddings=rope.original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": rope.theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def write_safetensors(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """`model.safetensors`, or shards with `model.safetensors.index.json` when larger than `max_shard_bytes`."""
    total = sum(v.nbytes for v in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(directory / "model.safetensors"), metadata=SAFETENSORS_METADATA)
        return
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        if current and size + value.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
    shards.append(current)
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata=SAFETENSORS_METADATA)
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_merged(out_dir, model: Llama, params: dict, adapters: dict, tokenizer=None, dtype: str = "float32",
                  max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """A Hugging Face checkpoint of the base with `adapters` merged in, in `dtype`."""
    merged = merge_adapters(model, params, adapters)
    tensors = to_hf_tensors(merged, model.config, np_dtype(dtype))
    with atomic_directory(out_dir, overwrite) as tmp:
        config = hf_config(model.config, dtype, *_special_ids(tokenizer))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: v for k, v in zip(("bos_token_id", "eos_token_id"), _special_ids(tokenizer)) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_safetensors(tmp, tensors, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def peft_config(model: Llama, base_model: str, vocab_grew: bool) -> dict:
    lora, rows = model.lora, model.token_rows
    if rows.head_ids:
        token_indices = {"embed_tokens": list(rows.embed_ids), "lm_head": list(rows.head_ids)}
    else:
        token_indices = list(rows.embed_ids) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank if lora else 8,
        "lora_alpha": lora.alpha if lora else 8,
        "lora_dropout": lora.dropout if lora else 0.0,
        "use_rslora": lora.rslora if lora else False,
        "target_modules": sorted(lora.targets) if lora else [],
        "trainable_token_indices": token_indices,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "revision": None,
    }


def export_peft(out_dir, model: Llama, adapters: dict, base_model: str, tokenizer=None, vocab_grew: bool = False,
                overwrite: bool = False) -> Path:
    """A PEFT adapter directory: adapter_config.json, adapter_model.safetensors, README.md, maybe the tokenizer."""
    tensors = to_peft(adapters)
    with atomic_directory(out_dir, overwrite) as tmp:
        config = peft_config(model, base_model, vocab_grew)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=SAFETENSORS_METADATA)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_model_card(base_model, vocab_grew, model))
    return Path(out_dir)


def _special_ids(tokenizer) -> tuple[Optional[int], Optional[int]]:
    if tokenizer is None:
        return None, None
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def _model_card(base_model: str, vocab_grew: bool, model: Llama) -> str:
    resize = (
        "tokenizer = AutoTokenizer.from_pretrained(ADAPTER_DIR)\n"
        "base.resize_token_embeddings(len(tokenizer))  # the adapter adds tokens; their rows come from it\n"
        if vocab_grew else "tokenizer = AutoTokenizer.from_pretrained(BASE)\n"
    )
    return (
        f"# LoRA adapter trained with jaxtok\n\n"
        f"Base model: `{base_model}`. LoRA rank {model.lora.rank if model.lora else '-'}, "
        f"trainable token rows: {list(model.token_rows.embed_ids)}.\n\n"
        "Load it with PEFT:\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n\n"
        f"BASE, ADAPTER_DIR = {base_model!r}, 'path/to/this/directory'\n"
        "base = AutoModelForCausalLM.from_pretrained(BASE)\n" + resize +
        "model = PeftModel.from_pretrained(base, ADAPTER_DIR)\n```\n"
    )
