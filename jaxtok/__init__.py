"""jaxtok: fine-tune Llama models in JAX with LoRA and trainable token rows, interchangeably with Hugging Face PEFT.

The names a library user needs, from loading a checkpoint to exporting a PEFT adapter (README: "Using jaxtok as a
library"). They load on first use, so `import jaxtok` stays quick and the command-line tools answer `--help` without
starting JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    # load a Hugging Face checkpoint and its tokenizer
    "load_pretrained": "jaxtok.convert",
    "load_tokenizer": "jaxtok.tokenizer",
    "Llama": "jaxtok.model",
    # new tokens and the rows that train
    "add_tokens": "jaxtok.vocab",
    "plan_rows": "jaxtok.vocab",
    "TokenRows": "jaxtok.tokens",
    "LoraConfig": "jaxtok.lora",
    "init_adapters": "jaxtok.trainable",
    "split": "jaxtok.trainable",
    "labels": "jaxtok.trainable",
    "adapters_of": "jaxtok.trainable",
    # data, optimizer and the train step
    "prepare": "jaxtok.data",
    "Batches": "jaxtok.data",
    "OptimConfig": "jaxtok.optimizer",
    "make_optimizer": "jaxtok.optimizer",
    "schedule": "jaxtok.optimizer",
    "init_state": "jaxtok.step",
    "make_train_step": "jaxtok.step",
    "residual_buffers": "jaxtok.step",
    # export
    "export_peft": "jaxtok.export",
    "export_merged": "jaxtok.export",
    # the whole job, as scripts/train.py runs it
    "default_config": "jaxtok.run_config",
    "RunConfig": "jaxtok.run_config",
    "run": "jaxtok.train",
}

__all__ = ["__version__", *_HOMES]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'jaxtok' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
