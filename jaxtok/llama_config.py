"""The architecture of a Llama model, read from a Hugging Face `config.json`.

`LlamaConfig` describes the network only (sizes, RoPE, norms, tying); what to train and how lives in the run config.
Two spellings of `config.json` are found in the wild and both are read here:

* Meta / transformers 4: `rope_theta`, `rope_scaling` (`{"rope_type": "llama3", ...}`, older files say `"type"`),
  `torch_dtype`;
* transformers 5: `rope_parameters` (`{"rope_type": "default", "rope_theta": ...}`), `dtype`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtok.errors import JaxtokError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies: `theta`, and for scaled types the parameters HF names the same way."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes in the shape legend: V vocab, D hidden, F mlp, N query heads, K kv heads, H head dim, L layers."""

    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    checkpoint_dtype: str = "float32"  # dtype the checkpoint was saved in, as config.json says

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise JaxtokError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.rope.type not in ROPE_TYPES:
            raise JaxtokError(f"RoPE type {self.rope.type!r} is not supported; jaxtok supports {', '.join(ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Reads a `config.json` dict of a `LlamaForCausalLM` checkpoint, in either spelling."""
        architectures = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in architectures):
            found = ", ".join(architectures) or f"model_type={model_type!r}"
            raise JaxtokError(f"checkpoint is not a Llama: config.json describes {found}; jaxtok loads LlamaForCausalLM")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise JaxtokError(f"config.json sets {key}=true; jaxtok supports Llama checkpoints without biases")
        try:
            num_heads = hf["num_attention_heads"]
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope=_rope_from_hf(hf),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                checkpoint_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            )
        except KeyError as e:
            raise JaxtokError(f"config.json lacks the key {e.args[0]!r} that every Llama config has") from None


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5 folds theta into rope_parameters; transformers 4 keeps it beside rope_scaling.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise JaxtokError(f"RoPE type {rope_type!r} is not supported; jaxtok supports {', '.join(ROPE_TYPES)}")
    fields = {f.name for f in dataclasses.fields(RopeConfig)}
    extra = {k: v for k, v in params.items() if k in fields and k not in ("theta", "type")}
    return RopeConfig(theta=float(theta), type=rope_type, **extra)
