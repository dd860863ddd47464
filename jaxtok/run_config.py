"""Every key of a training run, with its default and meaning, and the typed, checked sections the job reads.

Config files start from `default_config()`, an `ml_collections.ConfigDict` that `config_flags` loads with the config
locked, so an override of a key that does not exist (`--config.lora.rnak=8`) is an error naming the key, not a
silently ignored typo. `RunConfig.of(config)` then turns it, once, into frozen sections whose values are checked, so
a bad value fails before anything slow with the key's name; each part of the job is given the section it reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import ml_collections

from jaxtok.errors import JaxtokError
from jaxtok.lora import LoraConfig
from jaxtok.model import REMAT_POLICIES
from jaxtok.optimizer import OptimConfig
from jaxtok.trainable import METHODS

WEIGHT_DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF checkpoint: local directory or Hub id; "jaxtok:demo-base" builds the offline demo base
    c.model.dtype = "bfloat16"  # dtype of the frozen base weights: float32 or bfloat16
    c.model.compute_dtype = ml_collections.FieldReference(None, field_type=str)  # activations; None: as model.dtype
    c.model.allow_pickle = False  # read pytorch_model.bin (pickle can run code); safetensors need no opt-in
    c.model.remat = "none"  # gradient checkpointing per layer: none, full (keep only layer inputs), dots (keep matmuls)
    c.model.loss_chunk = 0  # positions per chunk of the fused head + loss (evaluation, lora+full); 0 chooses
    c.model.loss_vocab_block = 0  # head rows per block of the fused head + loss (lora, lora+rows, rows); 0 chooses
    c.model.attention = ""  # attention: "" (jaxtok's causal blocks; JAX's with a cache), "xla" or "cudnn" (JAX's)
    c.model.adapter = ""  # a PEFT adapter (directory or Hub id) to continue training; it sets lora.* and tokens

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # .jsonl/.json/.parquet/.csv file, local dataset directory, or dataset name
    c.data.train_split = "train"  # split of a named dataset
    c.data.eval = ""  # same kinds as data.train; "" skips evaluation
    c.data.eval_split = "test"
    c.data.format = "auto"  # auto, text, prompt_completion or messages (TRL's row formats)
    c.data.packing = True  # several rows per sequence (attention stays within each row); False pads each row
    c.data.chat_template = ""  # Jinja chat template for `messages` rows when the tokenizer has none

    c.tokens = ml_collections.ConfigDict()
    c.tokens.add = ()  # new special tokens (strings) added to the tokenizer and trained as token rows
    c.tokens.descriptions = ()  # optional, one per added token: its row starts as the mean of this text's rows
    c.tokens.train = ()  # existing tokens (strings or ids) whose rows train, e.g. Llama 3's untrained chat tokens
    c.tokens.train_head = "added"  # untied heads: which head rows train: added (+ untrained), all or none
    c.tokens.train_untrained = False  # also train the base's untrained rows (zero or tiny norm) the data use

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16  # LoRA rank r
    c.lora.alpha = 32.0  # scaling = alpha / r (alpha / sqrt(r) with rslora)
    c.lora.dropout = 0.0  # dropout on the LoRA input only
    c.lora.targets = "all-linear"  # "all-linear" or a tuple of q_proj, k_proj, v_proj, o_proj, gate_proj, ...
    c.lora.rslora = False  # rank-stabilised scaling

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4  # peak learning rate of LoRA
    c.optim.token_lr = ml_collections.FieldReference(None, field_type=float)  # token rows; None: optim.lr
    c.optim.weight_decay = 0.0  # decoupled weight decay of LoRA
    c.optim.token_weight_decay = 0.0  # of token rows: keep 0, decay pulls rows to zero, not to their start
    c.optim.warmup_steps = 0  # linear warmup from 0
    c.optim.schedule = "cosine"  # after warmup: cosine, linear or constant
    c.optim.min_lr_ratio = 0.0  # where the decay ends, as a fraction of the peak
    c.optim.max_grad_norm = 1.0  # clip the global gradient norm; 0 turns clipping off

    c.train = ml_collections.ConfigDict()
    c.train.method = "lora+rows"  # what trains: lora, lora+rows, lora+full (whole embedding and head) or rows (no LoRA)
    c.train.steps = 1000  # optimizer steps
    c.train.batch_size = 8  # sequences per micro-batch (global, over all devices and hosts)
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.seq_len = 1024  # tokens per sequence
    c.train.seed = 0  # data order, LoRA init, dropout
    c.train.eval_every = 0  # evaluate every N steps; 0: only before the first and after the last step
    c.train.save_every = 200  # checkpoint every N steps (and always at the end); 0: only at the end
    c.train.keep_checkpoints = 3  # how many recent checkpoints to keep
    c.train.log_every = 10  # write metrics every N steps
    c.train.tensorboard = True  # also write TensorBoard event files under output_dir/tensorboard

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # devices as (data, fsdp, tensor); -1: the rest. Default: FSDP over all devices

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # "host:port" of process 0 to run several processes; "" runs one
    c.distributed.num_processes = 1  # processes in the job (with coordinator)
    c.distributed.process_id = 0  # this process's index (with coordinator)
    c.distributed.auto = False  # let jax.distributed.initialize() read SLURM / TPU pod / MPI settings instead

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = ""  # after training, print a greedy continuation of this prompt ("" skips)
    c.sample.max_new_tokens = 48
    c.sample.stop = ""  # token that ends the sample; "": the tokenizer's EOS
    c.sample.calculator = False  # run a reply's <|calc|>A op B<|/calc|> call, give the result back as a tool turn
    c.sample.heldout = ""  # messages file: ask each row's question, print "held-out questions: N/M right", heldout.json
    c.sample.heldout_rows = 10  # how many rows of sample.heldout to ask (its first ones)

    c.export = ml_collections.ConfigDict()
    c.export.peft = True  # write output_dir/adapter in PEFT's format
    c.export.merged = True  # write output_dir/merged, the base with the adapter merged in
    c.export.merged_dtype = ""  # dtype of the merged weights; "": as model.dtype

    c.output_dir = ""  # run_config.json, tokenizer/, checkpoints/, metrics.jsonl, tensorboard/, adapter/, merged/
    return c


def load_run_config(path) -> ml_collections.ConfigDict:
    """The config a run saved (`output_dir/run_config.json`), over today's defaults, with JSON lists as tuples."""
    import json

    saved = json.loads(open(path).read())
    remat = saved.get("model", {}).get("remat")
    if isinstance(remat, bool):  # saved before model.remat named a policy
        saved["model"]["remat"] = "full" if remat else "none"
    if saved.get("train", {}).pop("full_embeddings", False):  # saved before train.method
        saved["train"]["method"] = "lora+full"
    config = default_config()

    def fill(node, values, prefix):
        for key, value in values.items():
            if key not in node:
                continue  # a key a later version removed
            if isinstance(value, dict):
                fill(node[key], value, f"{prefix}{key}.")
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    fill(config, saved, "")
    return config


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str
    dtype: str
    compute_dtype: Optional[str]
    allow_pickle: bool
    remat: str
    loss_chunk: int
    loss_vocab_block: int
    attention: str
    adapter: str


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str
    train_split: str
    eval: str
    eval_split: str
    format: str
    packing: bool
    chat_template: str


@dataclasses.dataclass(frozen=True)
class TokensSection:
    add: tuple[str, ...]
    descriptions: tuple[str, ...]
    train: tuple[Union[str, int], ...]
    train_head: str
    train_untrained: bool


@dataclasses.dataclass(frozen=True)
class TrainSection:
    method: str
    steps: int
    batch_size: int
    grad_accum: int
    seq_len: int
    seed: int
    eval_every: int
    save_every: int
    keep_checkpoints: int
    log_every: int
    tensorboard: bool


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    coordinator: str
    num_processes: int
    process_id: int
    auto: bool


@dataclasses.dataclass(frozen=True)
class SampleSection:
    prompt: str
    max_new_tokens: int
    stop: str
    calculator: bool
    heldout: str
    heldout_rows: int


@dataclasses.dataclass(frozen=True)
class ExportSection:
    peft: bool
    merged: bool
    merged_dtype: str


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's config as typed sections, checked. `source` is the ConfigDict it came from, saved with the run."""

    model: ModelSection
    data: DataSection
    tokens: TokensSection
    lora: LoraConfig
    optim: OptimConfig
    train: TrainSection
    mesh_shape: tuple[int, ...]
    distributed: DistributedSection
    sample: SampleSection
    export: ExportSection
    output_dir: str
    source: ml_collections.ConfigDict = dataclasses.field(repr=False, compare=False)

    @classmethod
    def of(cls, config: Union[ml_collections.ConfigDict, "RunConfig"]) -> "RunConfig":
        """The sections of `config`; a value that would only break later fails now, naming its key."""
        if isinstance(config, RunConfig):
            return config

        def section(kind, node):
            return kind(**{f.name: node[f.name] for f in dataclasses.fields(kind)})

        c = config
        _check(c)
        o = c.optim
        optim = OptimConfig(
            lr=float(o.lr), token_lr=None if o.token_lr is None else float(o.token_lr),
            weight_decay=float(o.weight_decay), token_weight_decay=float(o.token_weight_decay),
            warmup_steps=o.warmup_steps, schedule=o.schedule, min_lr_ratio=float(o.min_lr_ratio),
            max_grad_norm=float(o.max_grad_norm), total_steps=c.train.steps)
        lora = LoraConfig(rank=c.lora.rank, alpha=float(c.lora.alpha), dropout=float(c.lora.dropout),
                          targets=c.lora.targets, rslora=c.lora.rslora)
        return cls(
            model=section(ModelSection, c.model), data=section(DataSection, c.data),
            tokens=section(TokensSection, c.tokens), lora=lora, optim=optim, train=section(TrainSection, c.train),
            mesh_shape=tuple(c.mesh.shape), distributed=section(DistributedSection, c.distributed),
            sample=section(SampleSection, c.sample), export=section(ExportSection, c.export),
            output_dir=c.output_dir, source=c,
        )

    def to_json(self) -> str:
        return self.source.to_json_best_effort(indent=2) + "\n"


def _check(c: ml_collections.ConfigDict) -> None:
    t = c.train
    for key in ("steps", "batch_size", "grad_accum", "log_every"):
        value = t[key]
        if not isinstance(value, int) or value < 1:
            raise JaxtokError(f"train.{key} must be a positive integer (got {value!r})")
    for key in ("eval_every", "save_every"):
        if not isinstance(t[key], int) or t[key] < 0:
            raise JaxtokError(f"train.{key} must be an integer >= 0 (got {t[key]!r}; 0 means only at the end)")
    if not isinstance(t.seq_len, int) or t.seq_len < 2:
        raise JaxtokError(f"train.seq_len must be at least 2 (got {t.seq_len!r}): a loss needs two tokens")
    for key in ("dtype", "compute_dtype"):
        value = c.model[key]
        if value is not None and value not in WEIGHT_DTYPES:
            raise JaxtokError(f"model.{key} must be one of {', '.join(WEIGHT_DTYPES)} (got {value!r})")
    if c.model.remat not in REMAT_POLICIES:
        raise JaxtokError(f"model.remat must be one of {', '.join(REMAT_POLICIES)} (got {c.model.remat!r})")
    for key in ("loss_chunk", "loss_vocab_block"):
        if not isinstance(c.model[key], int) or c.model[key] < 0:
            raise JaxtokError(f"model.{key} must be an integer >= 0 (got {c.model[key]!r}; 0 chooses)")
    if t.method not in METHODS:
        raise JaxtokError(f"train.method must be one of {', '.join(METHODS)} (got {t.method!r})")
    s = c.sample
    if s.heldout and (not isinstance(s.heldout_rows, int) or s.heldout_rows < 1):
        raise JaxtokError(f"sample.heldout_rows must be a positive integer (got {s.heldout_rows!r})")
    if c.tokens.train_untrained and c.model.adapter:
        raise JaxtokError("model.adapter brings its own token rows; set tokens.train_untrained=False")
    if not c.output_dir:
        raise JaxtokError("output_dir is empty; set --config.output_dir=DIR")
    out = Path(c.output_dir)
    if out.exists() and not out.is_dir():
        raise JaxtokError(f"output_dir {out} is a file; choose a directory")
