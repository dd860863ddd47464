"""Exports to the PyTorch ecosystem: a PEFT adapter directory and a merged Hugging Face checkpoint.

Both are written atomically (see `atomic`). The adapter holds float32 LoRA matrices and token tables under PEFT's
names (`peft_format`) with an `adapter_config.json` PEFT reads as it is; the merged checkpoint is the base with the
adapters folded in (`merge`), written through the conversion table backwards, sharded above `max_shard_bytes`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxtok.atomic import atomic_directory, check_target
from jaxtok.convert import np_dtype, to_hf_tensors
from jaxtok.errors import JaxtokError
from jaxtok.llama_config import LlamaConfig
from jaxtok.merge import merge_adapters
from jaxtok.model import Llama
from jaxtok.peft_format import (
    TRAINABLE_TOKENS,
    adapter_config,
    check_shapes,
    modules_to_save,
    peft_type_of,
    to_peft,
)

SAFETENSORS_METADATA = {"format": "pt"}


def hf_config(config: LlamaConfig, dtype: str, bos_token_id=None, eos_token_id=None) -> dict:
    """config.json for the config's family (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...) in the transformers-4
    spelling, which transformers 4 and 5 both read."""
    rope = config.rope
    rope_scaling = None
    if rope.type != "default":
        rope_scaling = {"rope_type": rope.type, "factor": rope.factor}
        if rope.type == "llama3":
            rope_scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                                original_max_position_embeddings=rope.original_max_position_embeddings)
    return {
        **config.to_hf(),  # architectures, model_type and the family's keys: biases, q/k norm, sliding window
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
    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    size = 0
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
    """A Hugging Face checkpoint of the base with `adapters` merged in, in `dtype` (float32, bfloat16 or float16),
    that `AutoModelForCausalLM.from_pretrained` loads. `model.config` gives the (possibly grown) vocabulary and the
    tying; `tokenizer`, when given, is saved beside the weights and gives the BOS and EOS ids."""
    np_type = np_dtype(dtype)
    check_target(Path(out_dir), overwrite)  # before the merge, which can take a while on a large model
    merged = merge_adapters(model, params, adapters, dtype=jnp.dtype(np_type))
    tensors = to_hf_tensors(merged, model.config, np_type)
    del merged
    bos, eos = _special_ids(tokenizer)
    with atomic_directory(out_dir, overwrite) as tmp:
        _write_json(tmp / "config.json", hf_config(model.config, dtype, bos, eos))
        generation = {"bos_token_id": bos, "eos_token_id": eos}
        _write_json(tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        write_safetensors(tmp, tensors, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def export_peft(out_dir, model: Llama, adapters: dict, base_model: str, tokenizer=None,
                added_ids: Sequence[int] = (), overwrite: bool = False, full_params: Optional[dict] = None) -> Path:
    """A PEFT adapter directory: adapter_config.json, adapter_model.safetensors, README.md, and the tokenizer.

    A model with LoRA gives a LoRA adapter (its token rows as `trainable_token_indices`); a model with token rows and
    `lora=None` gives PEFT's standalone trainable-tokens adapter (`TrainableTokensConfig`, peft_type
    TRAINABLE_TOKENS), which has one list of ids for every layer: an untied head must then train the embedding's ids,
    or rows of its own with no embedding rows, or none.

    `base_model` is what `base_model_name_or_path` records (a Hub id or path of the base checkpoint). `added_ids` are
    the ids of tokens added to the base's vocabulary (`jaxtok.vocab.add_tokens`); then `tokenizer` must be given,
    and the adapter must hold the rows of those tokens, since PEFT users resize the base, which fills new rows with
    random values. PEFT's `save_embedding_layers` is never used: the adapter stays small.

    `full_params` (method lora+full): the params whose whole embedding (and untied head) trained. They go in as PEFT's
    `modules_to_save` (with `ensure_weight_tying` for a tied head), so the adapter carries every row, added ones too.
    """
    rows = model.token_rows
    if full_params is not None:
        added_ids = ()  # the whole matrices hold their rows
    missing = [i for i in added_ids if i not in rows.embed_ids]
    if missing:
        raise JaxtokError(f"added tokens {missing} have no trained embedding rows, so PEFT would give them random "
                          "rows; train the rows of added tokens (jaxtok.vocab.plan_rows)")
    missing = [i for i in added_ids if not model.config.tie_word_embeddings and i not in rows.head_ids]
    if missing:
        raise JaxtokError(f"added tokens {missing} have no trained head rows, so PEFT would give them random rows; "
                          "train them (tokens.train_head: added) or export a merged checkpoint instead")
    if added_ids and tokenizer is None:
        raise JaxtokError("tokens were added, so the adapter needs its tokenizer; pass tokenizer=")
    config = adapter_config(model, base_model)  # refuses what PEFT cannot express
    adapters = jax.device_get(adapters)
    check_shapes(adapters, model)
    tensors = to_peft(adapters, peft_type_of(model), model.config.tie_word_embeddings)
    if full_params is not None:
        config, matrices = modules_to_save(config, full_params, model.config.tie_word_embeddings)
        tensors.update(matrices)
    with atomic_directory(out_dir, overwrite) as tmp:
        _write_json(tmp / "adapter_config.json", config)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=SAFETENSORS_METADATA)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_model_card(base_model, model, bool(added_ids)))
    return Path(out_dir)


def _write_json(path: Path, value: dict) -> None:
    # sorted keys and indent 2, as transformers and PEFT write their JSON files
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _special_ids(tokenizer) -> tuple[Optional[int], Optional[int]]:
    if tokenizer is None:
        return None, None
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def _model_card(base_model: str, model: Llama, tokens_added: bool) -> str:
    lora, rows = model.lora, model.token_rows
    standalone = peft_type_of(model) == TRAINABLE_TOKENS
    lines = [
        "---",
        f"base_model: {json.dumps(base_model)}",  # a JSON string is a YAML string, whatever characters it holds
        "library_name: peft",
        f"tags: [{'trainable-tokens' if standalone else 'lora'}, jaxtok]",
        "---",
        "",
        f"# {'Trainable-tokens' if standalone else 'LoRA'} adapter trained with jaxtok",
        "",
    ]
    if standalone:
        lines.append(f"Base model: `{base_model}`. No LoRA: PEFT's `TrainableTokensConfig` (trained token rows only).")
    else:
        assert lora is not None  # peft_type_of: LoRA exactly when the model has it
        lines.append(f"Base model: `{base_model}`. LoRA rank {lora.rank}, alpha {lora.alpha:g}"
                     f"{' (rsLoRA)' if lora.rslora else ''}, on {', '.join(lora.targets)}.")
    key = "token_indices" if standalone else "trainable_token_indices"
    if rows.embed_ids:
        lines.append(f"Trained embedding rows (PEFT `{key}`): {list(rows.embed_ids)}.")
    if rows.head_ids:
        lines.append(f"Trained rows of the (untied) output head: {list(rows.head_ids)}.")
    lines += ["", "Load it with PEFT:", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
              "model = AutoPeftModelForCausalLM.from_pretrained('path/to/this/directory')", "```", "",
              "or step by step:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "from peft import PeftModel", "", f"BASE, ADAPTER = {base_model!r}, 'path/to/this/directory'",
              "base = AutoModelForCausalLM.from_pretrained(BASE)"]
    if tokens_added:
        lines += ["tokenizer = AutoTokenizer.from_pretrained(ADAPTER)  # holds the added tokens",
                  f"# the adapter adds tokens: grow the base to {model.config.vocab_size} rows; the rows of the added",
                  "# tokens come from the adapter, whatever values the resize gives them",
                  f"base.resize_token_embeddings({model.config.vocab_size})"]
    else:
        lines.append("tokenizer = AutoTokenizer.from_pretrained(BASE)")
    lines += ["model = PeftModel.from_pretrained(base, ADAPTER)", "```", ""]
    return "\n".join(lines)
