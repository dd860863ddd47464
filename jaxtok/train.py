"""The training job: a run config in, a trained adapter, a merged checkpoint and a metrics log out.

`run(config)` reads the base checkpoint, adds and plans the token rows, prepares the data, then trains LoRA + token
rows with evaluation before the first step, every `train.eval_every` steps and after the last, checkpoints every
`train.save_every` steps and at the end, and finally exports a PEFT adapter and a merged Hugging Face checkpoint.

Resuming: started again on an `output_dir` that holds checkpoints, the job restores the latest and continues. The
data order is a function of (seed, step) and the RNG and optimizer state are in the checkpoint, so a killed and
resumed run ends with the same adapter as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxtok import chat as chat_lib
from jaxtok import data as data_lib
from jaxtok import peft_format
from jaxtok import tokens as token_rows_lib
from jaxtok import trainable as trainable_lib
from jaxtok.checkpoint import Checkpoints
from jaxtok.convert import load_pretrained
from jaxtok.demo import resolve_model_path
from jaxtok.errors import JaxtokError, Stopped
from jaxtok.evaluate import evaluate_sequences
from jaxtok.export import export_merged, export_peft
from jaxtok.generate import generate
from jaxtok.lora import LoraConfig
from jaxtok.metrics import MetricsWriter, drop_after
from jaxtok.model import REMAT_POLICIES, Llama, abstract_variables, logical_axes_of
from jaxtok.optimizer import OptimConfig, make_optimizer, schedule
from jaxtok.peft_import import apply_adapter
from jaxtok.sharding import (
    RULES,
    batch_sharding,
    global_array,
    global_batch,
    initialize_distributed,
    make_mesh,
    tree_shardings,
)
from jaxtok.run_lock import RunLock
from jaxtok.step import TrainState, init_state, make_train_step, state_shardings
from jaxtok.stop import StopSignals
from jaxtok.tokenizer import load_tokenizer
from jaxtok.untrained import Untrained, read_untrained
from jaxtok.untrained import report as untrained_report
from jaxtok.vocab import add_tokens, plan_rows, resolve_tokens

WEIGHT_DTYPES = ("float32", "bfloat16")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, with the key's name, on values that would only break later."""
    t = config.train
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
        value = config.model[key]
        if value is not None and value not in WEIGHT_DTYPES:
            raise JaxtokError(f"model.{key} must be one of {', '.join(WEIGHT_DTYPES)} (got {value!r})")
    remat_policy(config.model.remat)
    if not isinstance(config.model.loss_chunk, int) or config.model.loss_chunk < 0:
        raise JaxtokError(f"model.loss_chunk must be an integer >= 0 (got {config.model.loss_chunk!r}; 0 chooses)")
    optim_config(config)  # OptimConfig and LoraConfig check their own values: run those checks before anything slow
    lora_config(config)
    if config.train.method not in trainable_lib.METHODS:
        raise JaxtokError(f"train.method must be one of {', '.join(trainable_lib.METHODS)} "
                          f"(got {config.train.method!r})")
    if config.sample.heldout and (not isinstance(config.sample.heldout_rows, int) or config.sample.heldout_rows < 1):
        raise JaxtokError(f"sample.heldout_rows must be a positive integer (got {config.sample.heldout_rows!r})")
    if config.tokens.train_untrained and config.model.adapter:
        raise JaxtokError("model.adapter brings its own token rows; set tokens.train_untrained=False")
    if not config.output_dir:
        raise JaxtokError("output_dir is empty; set --config.output_dir=DIR")
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise JaxtokError(f"output_dir {out} is a file; choose a directory")


def remat_policy(value) -> str:
    """model.remat, checked to be a key of REMAT_POLICIES."""
    if value not in REMAT_POLICIES:
        raise JaxtokError(f"model.remat must be one of {', '.join(REMAT_POLICIES)} (got {value!r})")
    return value


def lora_config(config) -> LoraConfig:
    c = config.lora
    return LoraConfig(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), targets=c.targets, rslora=c.rslora)


def optim_config(config) -> OptimConfig:
    c = config.optim
    return OptimConfig(
        lr=float(c.lr), token_lr=None if c.token_lr is None else float(c.token_lr), weight_decay=float(c.weight_decay),
        token_weight_decay=float(c.token_weight_decay), warmup_steps=c.warmup_steps, schedule=c.schedule,
        min_lr_ratio=float(c.min_lr_ratio), max_grad_norm=float(c.max_grad_norm), total_steps=config.train.steps,
    )


@dataclasses.dataclass
class Setup:
    """Everything a run builds before its first step (the data fields stay None for export and evaluation)."""

    model: Llama
    frozen: dict
    adapters: dict
    tokenizer: Any
    model_path: str
    added_ids: tuple[int, ...]
    base_vocab: int
    mesh: Mesh
    new_ids: tuple[int, ...] = ()  # added and tokens.train ids, whatever the method trains: new-token accuracy
    chat_template: Optional[str] = None
    fmt: str = "text"
    train_data: Optional[data_lib.Batches] = None
    eval_sequences: Optional[dict] = None
    untrained_found: Optional[Untrained] = None  # with tokens.train_untrained: the base's untrained rows
    untrained_ids: tuple[int, ...] = ()  # those of them the training data use, which train


@dataclasses.dataclass
class Base:
    """The base checkpoint (in its shards) and its tokenizer, both with the tokens of tokens.add."""

    model: Llama
    params: dict
    tokenizer: Any
    model_path: str
    added_ids: tuple[int, ...]
    base_vocab: int  # before tokens.add


def load_base(config, mesh: Mesh) -> Base:
    """The base and its tokenizer, with tokens.add added to both (with model.adapter: as they are)."""
    model_path = resolve_model_path(config.model.path)  # the demo base is built on first use
    base, params = load_pretrained(
        model_path, dtype=config.model.dtype, compute_dtype=config.model.compute_dtype,
        allow_pickle=config.model.allow_pickle, remat=remat_policy(config.model.remat),
        attention_impl=config.model.attention or None, loss_chunk=config.model.loss_chunk, mesh=mesh,
    )
    tokenizer = load_tokenizer(model_path)
    if config.data.chat_template:  # exported tokenizers carry the template the model was trained with
        tokenizer.chat_template = config.data.chat_template
    if config.model.adapter:
        return Base(base, params, tokenizer, model_path, (), base.config.vocab_size)
    descriptions = tuple(config.tokens.descriptions) or None
    params, llama_config, added = add_tokens(tokenizer, params, base.config, tuple(config.tokens.add), descriptions)
    return Base(base.clone(config=llama_config), params, tokenizer, model_path, added, base.config.vocab_size)


def build_model(config, mesh: Mesh, base: Optional[Base] = None, untrained: tuple[int, ...] = ()) -> Setup:
    """The model with its token rows planned, and fresh or imported adapters, on `base` (default: loaded now).
    `untrained`: ids of the base's untrained rows that train too (tokens.train_untrained)."""
    base = base or load_base(config, mesh)
    if config.model.adapter:
        return _import_adapter(config, base, mesh)
    tokenizer, params, added, model_path = base.tokenizer, base.params, base.added_ids, base.model_path
    llama_config, base_vocab = base.model.config, base.base_vocab
    trained = resolve_tokens(tokenizer, tuple(config.tokens.train), llama_config.vocab_size)
    method = trainable_lib.method(config.train.method)
    rows = plan_rows(added, trained, llama_config.tie_word_embeddings, config.tokens.train_head, untrained)
    rows.validate(llama_config.vocab_size, llama_config.tie_word_embeddings)
    if not method.rows:
        rows = token_rows_lib.TokenRows()  # lora: the new rows stay as they start; lora+full: they train in the matrix
    elif not rows:
        raise JaxtokError(f"train.method={config.train.method} trains token rows, but tokens.add, tokens.train "
                          "and tokens.train_untrained give none; name the tokens, or choose another method")
    untrained_head = [i for i in added if not llama_config.tie_word_embeddings and i not in rows.head_ids]
    if method.rows and untrained_head and config.export.peft:
        raise JaxtokError("added tokens need trained head rows for a PEFT adapter (PEFT would give them random rows); "
                          "set tokens.train_head=added or export.peft=False")
    if not method.lora and config.export.peft:
        peft_format.standalone_targets(rows)  # PEFT's rows-only adapter must be able to hold them: fail before training
    model = base.model.clone(lora=lora_config(config) if method.lora else None, token_rows=rows)
    params = _place_params(model, params, mesh)  # the vocabulary may have grown
    adapters = trainable_lib.init_adapters(model, params, jax.random.key(config.train.seed),
                                           _adapter_shardings(model, mesh))
    return Setup(model, {"params": params}, adapters, tokenizer, model_path, added, base_vocab, mesh,
                 new_ids=tuple(dict.fromkeys(tuple(added) + tuple(trained) + tuple(untrained))),
                 untrained_ids=tuple(untrained))


def _place_params(model: Llama, params: dict, mesh: Mesh) -> dict:
    return jax.device_put(params, tree_shardings(params, logical_axes_of(model)["params"], mesh))


def _adapter_shardings(model: Llama, mesh: Mesh):
    logical = {k: v for k, v in logical_axes_of(model).items() if k != "params"}
    shapes = {k: v for k, v in nn.unbox(abstract_variables(model)).items() if k != "params"}
    return tree_shardings(shapes, logical, mesh)


def _import_adapter(config, loaded: Base, mesh: Mesh) -> Setup:
    """Continues from a PEFT adapter: its LoRA config and token rows replace the run config's lora and tokens."""
    if config.tokens.add or config.tokens.train:
        raise JaxtokError("model.adapter brings its own token rows; leave tokens.add and tokens.train empty")
    base, params, model_path, base_vocab = loaded.model, loaded.params, loaded.model_path, loaded.base_vocab
    model, params, adapters, tokenizer = apply_adapter(config.model.adapter, base, params, loaded.tokenizer)
    if config.data.chat_template:
        tokenizer.chat_template = config.data.chat_template
    added = tuple(i for i in model.token_rows.embed_ids if i >= base_vocab)
    params = _place_params(model, params, mesh)
    adapters = jax.device_put(adapters, _adapter_shardings(model, mesh))
    new_ids = tuple(dict.fromkeys(model.token_rows.embed_ids + model.token_rows.head_ids))
    return Setup(model, {"params": params}, adapters, tokenizer, model_path, added, base_vocab, mesh, new_ids=new_ids)


def build(config) -> Setup:
    """Everything before the first step; on a mesh, every array is created in its shards."""
    check_config(config)
    mesh = make_mesh(config.mesh.shape)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % batch_shards:
        raise JaxtokError(f"train.batch_size {config.train.batch_size} does not split over the mesh's "
                          f"data x fsdp = {batch_shards} devices; use a multiple of {batch_shards}")
    chat_template = config.data.chat_template or None
    t = config.train

    def prepare_train(tokenizer):
        return data_lib.prepare(config.data.train, tokenizer, config.data.format, t.seq_len, config.data.packing,
                                chat_template, split=config.data.train_split)

    found = None
    if config.tokens.train_untrained:  # which rows train depends on the data, so the data come first
        base = load_base(config, mesh)
        train_seqs, info = prepare_train(base.tokenizer)
        found, untrained = untrained_in_data(base, train_seqs, config.model.allow_pickle)
        setup = build_model(config, mesh, base, untrained)
    else:
        setup = build_model(config, mesh)
        train_seqs, info = prepare_train(setup.tokenizer)
    if (config.sample.calculator or config.sample.heldout) and info["format"] != "messages":
        raise JaxtokError(f"sample.calculator and sample.heldout need chat data (messages), not {info['format']}")
    if config.sample.heldout:  # a bad file fails now rather than after training
        chat_lib.load_questions(config.sample.heldout, config.sample.heldout_rows)
    eval_seqs = None
    if config.data.eval:
        eval_seqs, _ = data_lib.prepare(config.data.eval, setup.tokenizer, info["format"], t.seq_len, False,
                                        chat_template, split=config.data.eval_split)
    # Each process reads only the rows of a step's batch that its own devices hold (`sharding.global_batch`).
    batches = data_lib.Batches(train_seqs, t.batch_size, t.grad_accum, t.seed)
    if config.sample.stop:  # a bad token fails now rather than after training
        _stop_id(setup, config.sample.stop)
    return dataclasses.replace(setup, chat_template=chat_template, fmt=info["format"], train_data=batches,
                               eval_sequences=eval_seqs, untrained_found=found)


def untrained_in_data(base: Base, train_seqs: dict, allow_pickle: bool = False) -> tuple[Untrained, tuple[int, ...]]:
    """(the base checkpoint's untrained rows, the ids among them that the training sequences use), for
    tokens.train_untrained. Rows of tokens.add are not counted: they train as added tokens."""
    found = read_untrained(base.model_path, allow_pickle)
    used = set(np.unique(train_seqs["tokens"][train_seqs["segment_ids"] > 0]).tolist())
    return found, tuple(i for i in found.ids if i in used and i not in base.added_ids)


def initial_state(config, setup: Setup):
    """(state placed on the mesh, frozen tree, optimizer, state shardings) for a fresh run of `config`."""
    method = config.train.method
    trainable, frozen = trainable_lib.split(trainable_lib.merge(setup.frozen, setup.adapters), method)
    optimizer = make_optimizer(optim_config(config), trainable_lib.labels(trainable, method))
    trainable_sh = jax.tree.map(lambda x: x.sharding, trainable)
    state_sh = state_shardings(optimizer, trainable, trainable_sh, setup.mesh)
    state = jax.jit(lambda t: init_state(t, optimizer, config.train.seed), out_shardings=state_sh)(trainable)
    return state, frozen, optimizer, state_sh


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def summary(setup: Setup, config) -> str:
    total = _count(setup.frozen)
    lora, rows = _count(setup.adapters.get("lora", {})), _count(setup.adapters.get("tokens", {}))
    full = _count({k: v for k, v in setup.frozen["params"].items() if ("params", k) in trainable_lib.EMBEDDING_PATHS})
    full = full if trainable_lib.method(config.train.method).full else 0
    lora_model = setup.model.lora
    lora_text = (f"{lora:,} LoRA (rank {lora_model.rank}, {', '.join(lora_model.targets)})" if lora_model
                 else "no LoRA")
    model_rows = setup.model.token_rows
    names = {i: setup.tokenizer.convert_ids_to_tokens(i) for i in set(model_rows.embed_ids + model_rows.head_ids)}
    describe = lambda ids: ", ".join(f"{i} {names[i]!r}" for i in ids) or "none"  # noqa: E731
    devices = jax.devices()
    t = config.train
    return "\n".join([
        f"devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es))",
        f"model: {setup.model_path} (vocab {setup.base_vocab} -> {setup.model.config.vocab_size}, "
        f"{'tied' if setup.model.config.tie_word_embeddings else 'untied'} head, weights {config.model.dtype})",
        f"method: {config.train.method}",
        f"parameters: {total - full:,} frozen, {lora_text}, {rows:,} in token rows"
        + (f", {full:,} in the whole embedding and head" if full else "")
        + f"; trainable {100 * (lora + rows + full) / (total + lora + rows):.3f}%",
        f"token rows (embedding): {describe(model_rows.embed_ids)}",
        f"token rows (head): {describe(model_rows.head_ids) if not setup.model.config.tie_word_embeddings else 'tied'}",
        *(untrained_report(setup.untrained_found, setup.untrained_ids, setup.tokenizer) if setup.untrained_found
          else []),
        f"data: {setup.train_data.num_rows} training sequences ({setup.fmt}), batch {t.batch_size} x "
        f"{t.grad_accum} accumulation x {t.seq_len} tokens, {t.steps} steps",
    ])


def run(config: ml_collections.ConfigDict) -> dict:
    """Runs (or resumes) the job; returns the final evaluation and step metrics."""
    d = config.distributed
    initialize_distributed(d.coordinator, d.num_processes, d.process_id, d.auto)
    check_config(config)
    out = Path(config.output_dir)
    is_main = jax.process_index() == 0
    log = tqdm.write if is_main else (lambda *a, **k: None)  # tqdm.write keeps the progress bar intact
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    _hold(lock, log)
    try:
        return _run(config, out, log)
    finally:
        lock.release()


def _hold(lock: RunLock, log) -> None:
    """Process 0 takes the output folder's lock; every process stops if it could not."""
    problem = None
    if jax.process_index() == 0:
        try:
            lock.acquire(log)
        except JaxtokError as e:
            problem = e
    failed = problem is not None
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    if problem is not None:
        raise problem
    if failed:
        raise JaxtokError(f"process 0 could not take the lock on {lock.path.parent}; its output says why")


def _run(config, out: Path, log) -> dict:
    setup = build(config)
    is_main = jax.process_index() == 0
    log(summary(setup, config))

    if is_main:
        (out / "run_config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        setup.tokenizer.save_pretrained(str(out / "tokenizer"))
    state, frozen, optimizer, state_sh = initial_state(config, setup)
    optim = optim_config(config)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    step_fn = make_train_step(setup.model, optimizer, schedule(optim, optim.lr),
                              shardings=(state_sh, frozen_sh, batch_sharding(setup.mesh)))

    checkpoints = Checkpoints(out / "checkpoints", config.train.keep_checkpoints)
    record = {"token_rows": [list(setup.model.token_rows.embed_ids), list(setup.model.token_rows.head_ids)],
              "vocab_size": setup.model.config.vocab_size, "method": config.train.method}
    if setup.untrained_ids:  # load_run rebuilds the token rows from it, without the data
        record["untrained"] = list(setup.untrained_ids)
    start = 0
    restored = checkpoints.restore_newest(state, log)  # one that does not restore is moved aside, with a warning
    if restored is not None:
        state, saved = restored
        same = all(saved.get(k, "lora+rows" if k == "method" else None) == v for k, v in record.items())
        if not same:
            raise JaxtokError(f"{out} holds checkpoints of a run with another method, token rows or vocabulary; "
                              "use another output_dir or remove its checkpoints")
        start = int(state.step)
        log(f"resuming from the checkpoint at step {start}")
    drop_after(out, start)
    writer = MetricsWriter(out, tensorboard=config.train.tensorboard)
    try:
        with StopSignals() as stop:
            loop = _Loop(config, setup, state, frozen, step_fn, checkpoints, writer, record, log, stop)
            state, final = loop.run(start)
    finally:
        writer.close()
        checkpoints.close()
    _finish(config, setup, frozen, state, out, log)
    return final


def evaluate_setup(setup: Setup, variables, config) -> Optional[dict]:
    """Evaluation loss and new-token accuracy on the run's eval data (None without data.eval)."""
    if setup.eval_sequences is None:
        return None
    sharding = NamedSharding(setup.mesh, PartitionSpec(RULES["batch"], None))
    return evaluate_sequences(setup.model, variables, setup.eval_sequences, config.train.batch_size, progress=False,
                              place=lambda rows: global_array(rows, sharding), new_ids=setup.new_ids)


class _Loop:
    """The training loop's moving parts: the state, its metrics on their way to the log, evaluation, saving."""

    def __init__(self, config, setup: Setup, state: TrainState, frozen, step_fn, checkpoints, writer, record, log,
                 stop: StopSignals):
        self.config, self.setup, self.state, self.frozen = config, setup, state, frozen
        self.step_fn, self.checkpoints, self.writer, self.record, self.log = step_fn, checkpoints, writer, record, log
        self.stop = stop
        self.final: dict = {}
        self.pending: list[tuple[int, dict]] = []
        self.last_good = checkpoints.latest_step()
        self.batch_sharding = batch_sharding(setup.mesh)

    def due(self, step: int, every: int) -> bool:
        return every > 0 and step % every == 0

    def evaluate(self, step: int) -> None:
        result = evaluate_setup(self.setup, trainable_lib.merge(self.frozen, self.state.trainable), self.config)
        if result is not None:
            record = {"step": step, "eval_loss": result["eval_loss"], "eval_tokens": result["tokens"]}
            said = f"step {step}: eval_loss {result['eval_loss']:.4f} over {result['tokens']} tokens"
            if result["new_token_acc"] is not None:
                record["eval_new_token_acc"] = result["new_token_acc"]
                said += f", new-token accuracy {result['new_token_acc']:.3f} over {result['new_tokens']} targets"
            self.writer.write(record)
            self.log(said)
            self.final.update({k: v for k, v in record.items() if k.startswith("eval_")})

    def flush(self, since: float, bar) -> None:
        """Reads the pending step metrics from the device, stops on a non-finite loss, logs them.

        Steps run asynchronously: reading the metrics waits for them, so throughput is measured after the read.
        """
        records = [{"step": s, **{k: float(v) for k, v in jax.device_get(m).items()}} for s, m in self.pending]
        elapsed = time.perf_counter() - since
        self.pending = []
        for r in records:
            # a finite loss with a non-finite gradient still leaves non-finite parameters behind
            if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])):
                kept = (f"the checkpoint at step {self.last_good} is kept" if self.last_good
                        else "no checkpoint was saved")
                raise JaxtokError(f"the loss became {r['loss']} (gradient norm {r['grad_norm']}) at step "
                                  f"{r['step']}; {kept}. Lower optim.lr or check the data")
        tokens_per_s = sum(r["input_tokens"] for r in records) / max(elapsed, 1e-9)
        for r in records:
            r["tokens_per_s"] = tokens_per_s
            self.writer.write(r)
        self.final.update(records[-1])
        bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
        bar.update(len(records))

    def run(self, start: int) -> tuple[TrainState, dict]:
        t = self.config.train
        if start == 0 or self.due(start, t.eval_every) or start == t.steps:
            self.evaluate(start)
        bar = tqdm(total=t.steps, initial=start, desc="train", disable=jax.process_index() != 0)
        try:
            self.train(start, bar)
        finally:
            bar.close()  # before any error message, so the message is the last line
        if start < t.steps:
            self.evaluate(t.steps)
        return self.state, self.final

    def train(self, start: int, bar) -> None:
        t, due = self.config.train, self.due
        tick = time.perf_counter()
        for step in range(start, t.steps):
            batch = global_batch(self.setup.train_data, step, self.batch_sharding)
            self.state, metrics = self.step_fn(self.state, self.frozen, batch)
            done = step + 1
            self.pending.append((done, metrics))
            last = done == t.steps
            if due(done, t.log_every) or last or due(done, t.save_every) or due(done, t.eval_every):
                self.flush(tick, bar)
                tick = time.perf_counter()
            if due(done, t.eval_every) and not last:
                self.evaluate(done)
            if due(done, t.save_every) or last:
                self.save(done)
            if due(done, t.eval_every) or due(done, t.save_every):
                tick = time.perf_counter()  # throughput counts training time only
            signum = None if last else self.stop.requested()
            if signum:
                self.stop_at(done, signum, tick, bar)

    def save(self, done: int) -> None:
        epoch = self.setup.train_data.epoch_of(done)
        self.checkpoints.save(self.state, {**self.record, "step": done, "epoch": epoch})
        self.last_good = done

    def stop_at(self, done: int, signum: int, tick: float, bar) -> None:
        """After a stop signal: the step's metrics and a checkpoint at it, then `Stopped`."""
        if self.pending:
            self.flush(tick, bar)
        if self.last_good != done:
            self.save(done)
        name = signal.Signals(signum).name
        raise Stopped(f"stopped by {name} after step {done}; checkpoint saved in "
                      f"{self.checkpoints.directory / str(done)}. Run the same command again to resume.", 128 + signum)


def _host(tree):
    """The tree whole on every process: gathered across hosts when sharded over several (one process already
    addresses all of its devices)."""
    if jax.process_count() > 1:
        return jax.tree.map(jnp.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return tree


def _finish(config, setup: Setup, frozen: dict, state: TrainState, out: Path, log) -> None:
    """Exports (process 0 writes) and the sample (every process computes it: the model is sharded over them)."""
    is_main = jax.process_index() == 0
    variables = trainable_lib.merge(frozen, state.trainable)
    full = trainable_lib.method(config.train.method).full
    # gathered once: the merged export needs the params, and lora+full's adapter its whole embedding and head
    host_params = _host(variables["params"]) if config.export.merged or (config.export.peft and full) else None
    if config.export.peft:
        model, peft_adapters = peft_view(setup, variables, config.train.method)
        host_adapters = _host(peft_adapters)
        if is_main:
            export_peft(out / "adapter", model, host_adapters, setup.model_path, tokenizer=setup.tokenizer,
                        added_ids=setup.added_ids, overwrite=True, full_params=host_params if full else None)
            log(f"PEFT adapter: {out / 'adapter'}")
    if config.export.merged:
        host_adapters = _host(trainable_lib.adapters_of(variables))
        if is_main:
            export_merged(out / "merged", setup.model, host_params, host_adapters, tokenizer=setup.tokenizer,
                          dtype=config.export.merged_dtype or config.model.dtype, overwrite=True)
            log(f"merged checkpoint: {out / 'merged'}")
    s = config.sample
    if s.max_new_tokens < 1:
        return
    if s.prompt and s.calculator:
        added = chat_lib.converse(_chat(setup, variables, s), [[{"role": "user", "content": s.prompt}]])[0]
        log(f"sample: {s.prompt!r} -> {chat_lib.show(added)}")
    elif s.prompt:
        text = sample(setup, variables, s.prompt, s.max_new_tokens, s.stop)
        log(f"sample: {s.prompt!r} -> {text!r}")
    if s.heldout:
        result = chat_lib.score(_chat(setup, variables, s), chat_lib.load_questions(s.heldout, s.heldout_rows),
                                s.calculator)
        if is_main:
            chat_lib.write_score(out / "heldout.json", result)
        log(f"held-out questions: {result['right']}/{result['total']} right")
        if s.calculator:
            log(f"held-out calculator calls: {result['calls_right']}/{result['total']} right")


def peft_view(setup: Setup, variables: dict, method: str) -> tuple[Llama, dict]:
    """The model and adapters to export in PEFT's format. A PEFT LoRA adapter can bring rows the base lacks only as
    trainable tokens (or whole matrices, lora+full's), so where the method left the rows of added tokens frozen
    (lora), their initial rows go in as token rows that did not train."""
    model, rows = setup.model, setup.model.token_rows
    full = trainable_lib.method(method).full
    missing = () if full else tuple(i for i in setup.added_ids if i not in rows.embed_ids)
    adapters = trainable_lib.adapters_of(variables)
    if not missing:
        return model, adapters
    tied = model.config.tie_word_embeddings
    index = jnp.asarray(missing)
    tables = {"embed": jnp.take(variables["params"]["embed"], index, axis=0).astype(jnp.float32)}
    if not tied:
        tables["head"] = jnp.take(variables["params"]["lm_head"], index, axis=1).T.astype(jnp.float32)
    return model.clone(token_rows=token_rows_lib.TokenRows(missing, () if tied else missing)), {**adapters,
                                                                                                 "tokens": tables}


def _chat(setup: Setup, variables: dict, s) -> chat_lib.Chat:
    stop_id = _stop_id(setup, s.stop)
    return chat_lib.Chat(setup.model, variables, setup.tokenizer, setup.chat_template, s.max_new_tokens, stop_id)


def _stop_id(setup: Setup, stop: str) -> int:
    tokenizer = setup.tokenizer
    if not stop:
        return tokenizer.eos_token_id
    return resolve_tokens(tokenizer, (stop,), setup.model.config.vocab_size, key="sample.stop")[0]


def sample(setup: Setup, variables: dict, prompt: str, max_new_tokens: int, stop: str = "") -> str:
    """Greedy continuation of `prompt` (as a user turn for chat data), special tokens shown."""
    tokenizer = setup.tokenizer
    if setup.fmt == "messages":
        template = setup.chat_template or tokenizer.chat_template
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    stop_id = _stop_id(setup, stop)
    out = generate(setup.model, variables, [list(ids)], max_new_tokens, eos_id=stop_id,
                   pad_id=tokenizer.pad_token_id or 0)[0]
    return tokenizer.decode(out, skip_special_tokens=False)


def load_run(run_dir: str | Path, step: Optional[int] = None, model_path: Optional[str] = None,
             dtype: Optional[str] = None) -> tuple[Any, Setup, dict, TrainState]:
    """(config, setup, frozen, state) of a run's checkpoint at `step` (default: the latest), for export and
    generation; `model_path` and `dtype` replace the run's model.path (a copy of the base elsewhere) and model.dtype."""
    from jaxtok.run_config import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / "run_config.json").is_file():
        raise JaxtokError(f"{run_dir} is not a jaxtok run directory (no run_config.json); pass a run's output_dir")
    config = load_run_config(run_dir / "run_config.json")
    if model_path:
        config.model.path = model_path
    if dtype:
        config.model.dtype, config.model.compute_dtype = dtype, None
    checkpoints = Checkpoints(run_dir / "checkpoints")
    try:
        steps = checkpoints.steps()
        if not steps:
            raise JaxtokError(f"{run_dir} has no checkpoints yet")
        if step is not None and step not in steps:
            raise JaxtokError(f"{run_dir} has no checkpoint at step {step}; it has {sorted(steps)}")
        untrained = tuple(checkpoints.record(step).get("untrained", ())) if config.tokens.train_untrained else ()
        setup = build_model(config, make_mesh(config.mesh.shape if jax.process_count() > 1 else (1, -1, 1)),
                            untrained=untrained)
        like, frozen, _, _ = initial_state(config, setup)
        state, _ = checkpoints.restore(like, step)
    finally:
        checkpoints.close()
    return config, setup, frozen, state
