"""The architecture of a Llama-family model, read from a Hugging Face `config.json`.

`LlamaConfig` describes the network only (sizes, RoPE, norms, tying); what to train and how lives in the run config.
The families of `FAMILIES` are Llama's decoder with small differences, and those differences are fields here, not
other models: `biases` (the projections with a bias), `qk_norm` (RMSNorm on each query and key head before RoPE) and
`sliding_window` with `layer_types` (which layers see only the last `sliding_window` keys).

    family   transformers class   biases                                  qk_norm  sliding window
    llama    LlamaForCausalLM     q,k,v,o with attention_bias; mlp too     no       no
                                  with mlp_bias
    mistral  MistralForCausalLM   none                                    no       every layer, when sliding_window
    qwen2    Qwen2ForCausalLM     q,k,v always                            no       layers >= max_window_layers (or as
                                                                                   layer_types says), when
                                                                                   use_sliding_window
    qwen3    Qwen3ForCausalLM     q,k,v,o with attention_bias             yes      as qwen2

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
# The linear maps of a layer, by block, named as transformers names their modules.
PROJECTIONS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types


@dataclasses.dataclass(frozen=True)
class Family:
    """A `model_type` jaxtok loads, and its transformers class (the `architectures` entry of its config.json)."""

    model_type: str
    architecture: str


FAMILIES = {f.model_type: f for f in (Family("llama", "LlamaForCausalLM"), Family("mistral", "MistralForCausalLM"),
                                      Family("qwen2", "Qwen2ForCausalLM"), Family("qwen3", "Qwen3ForCausalLM"))}


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
    """The architecture; each size's comment is its letter in the shape legend (`jaxtok.shapes`)."""

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
    model_type: str = "llama"  # a key of FAMILIES
    biases: tuple[str, ...] = ()  # projections (of PROJECTIONS) with a bias; frozen like their kernels
    qk_norm: bool = False  # RMSNorm over H on every query and key head, before RoPE (Qwen3)
    sliding_window: int | None = None  # a sliding layer's query sees itself and the sliding_window - 1 keys before
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer; () is all FULL

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise JaxtokError(f"model_type {self.model_type!r} is not supported; jaxtok supports {', '.join(FAMILIES)}")
        unknown = [b for b in self.biases if b not in sum(PROJECTIONS.values(), ())]
        if unknown:
            raise JaxtokError(f"biases names {', '.join(unknown)}, which are no projections of a layer")
        if self.layer_types and (len(self.layer_types) != self.num_layers
                                 or any(t not in (FULL, SLIDING) for t in self.layer_types)):
            raise JaxtokError(f"layer_types must give {FULL!r} or {SLIDING!r} for each of the {self.num_layers} "
                              f"layers (got {list(self.layer_types)})")
        if SLIDING in self.layer_types and not (self.sliding_window or 0) >= 1:
            raise JaxtokError(f"layer_types has {SLIDING!r} layers but sliding_window is {self.sliding_window!r}; "
                              "set a window of at least 1")
        # one spelling per network, so equal networks compare equal: biases in PROJECTIONS order, no window and
        # layer_types () when no layer slides
        order = sum(PROJECTIONS.values(), ())
        object.__setattr__(self, "biases", tuple(p for p in order if p in self.biases))
        if SLIDING not in self.layer_types:
            object.__setattr__(self, "layer_types", ())
            object.__setattr__(self, "sliding_window", None)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.num_heads % self.num_kv_heads:
            raise JaxtokError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.rope.type not in ROPE_TYPES:
            raise JaxtokError(f"RoPE type {self.rope.type!r} is not supported; jaxtok supports {', '.join(ROPE_TYPES)}")

    @property
    def architecture(self) -> str:
        """The transformers class, e.g. "Qwen3ForCausalLM"."""
        return FAMILIES[self.model_type].architecture

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer, the sliding window of its attention, 0 for full attention; () when no layer slides."""
        if SLIDING not in self.layer_types:
            return ()
        window = self.sliding_window
        assert window is not None  # __post_init__ refuses sliding layers without a window
        return tuple(window if t == SLIDING else 0 for t in self.layer_types)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Reads the `config.json` dict of a checkpoint of one of `FAMILIES`, in either spelling."""
        architectures = hf.get("architectures") or []
        model_type = hf.get("model_type")
        family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
        if family is None or any(a != family.architecture for a in architectures):
            found = ", ".join(architectures) or f"model_type={model_type!r}"
            supported = ", ".join(f.architecture for f in FAMILIES.values())
            raise JaxtokError(f"jaxtok does not support {found}: it loads {supported}")
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
                model_type=family.model_type,  # == model_type
                **_FAMILY_FIELDS[family.model_type](hf),
            )
        except KeyError as e:
            raise JaxtokError(f"config.json lacks the key {e.args[0]!r} that every {family.architecture} config "
                              "has") from None

    def to_hf(self) -> dict[str, Any]:
        """The keys of config.json that name the family and give its differences from Llama (the inverse of the
        family's part of `from_hf`, in the transformers-4 spelling that transformers 4 and 5 both read)."""
        family, layer_types = FAMILIES[self.model_type], self.layer_types or (FULL,) * self.num_layers
        fields: dict[str, Any] = {"architectures": [family.architecture], "model_type": self.model_type}
        attn, mlp = (all(p in self.biases for p in PROJECTIONS[b]) for b in ("attn", "mlp"))
        window = self.sliding_window
        if self.model_type == "llama":
            fields.update(attention_bias=attn, mlp_bias=mlp)
        elif self.model_type == "mistral":
            fields.update(sliding_window=window)
        else:  # qwen2, qwen3: transformers 5 reads layer_types, transformers 4 max_window_layers
            first = layer_types.index(SLIDING) if window else self.num_layers
            fields.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=first,
                          layer_types=list(layer_types))
            if self.model_type == "qwen3":
                fields.update(attention_bias=attn)
        back = _FAMILY_FIELDS[self.model_type]({**fields, "num_hidden_layers": self.num_layers})
        if dataclasses.replace(self, **back) != self:
            raise JaxtokError(f"a {family.architecture} config.json cannot express biases={self.biases}, qk_norm="
                              f"{self.qk_norm}, sliding_window={self.sliding_window}, layer_types={self.layer_types}")
        return fields


def _layers_from_hf(hf: dict[str, Any], window) -> dict[str, Any]:
    """Qwen2 / Qwen3: the window counts only with use_sliding_window; layer_types, else layers from
    max_window_layers on, say which layers slide (as transformers 5's configs compute it)."""
    window = window if hf.get("use_sliding_window", False) else None
    L = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = hf.get("max_window_layers", 28)
        layer_types = [SLIDING if window is not None and i >= first else FULL for i in range(L)]
    if SLIDING in layer_types and window is None:
        raise JaxtokError(f"config.json's layer_types has {SLIDING!r} layers but no sliding window "
                          f"(use_sliding_window={hf.get('use_sliding_window')}, sliding_window="
                          f"{hf.get('sliding_window')}); transformers cannot run it either")
    return dict(sliding_window=window, layer_types=tuple(layer_types) if SLIDING in layer_types else ())


def _biases(attention: bool = False, mlp: bool = False) -> tuple[str, ...]:
    return (PROJECTIONS["attn"] if attention else ()) + (PROJECTIONS["mlp"] if mlp else ())


def _mistral(hf: dict[str, Any]) -> dict[str, Any]:
    # MistralForCausalLM windows every layer when sliding_window is set (it ignores any layer_types)
    window = hf.get("sliding_window") or None
    return dict(sliding_window=window, layer_types=(SLIDING,) * hf["num_hidden_layers"] if window else ())


# model_type -> the family's fields of LlamaConfig, from config.json
_FAMILY_FIELDS = {
    "llama": lambda hf: dict(biases=_biases(hf.get("attention_bias", False), hf.get("mlp_bias", False))),
    "mistral": _mistral,
    "qwen2": lambda hf: dict(biases=PROJECTIONS["attn"][:3], **_layers_from_hf(hf, hf.get("sliding_window"))),
    "qwen3": lambda hf: dict(biases=_biases(hf.get("attention_bias", False)), qk_norm=True,
                             **_layers_from_hf(hf, hf.get("sliding_window"))),
}


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
