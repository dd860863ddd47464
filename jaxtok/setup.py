"""Everything a run builds before its first step: the base and its tokenizer with the new tokens, the token rows, the
adapters (fresh or imported), the data, and the optimizer state, each array created in its shards on the mesh.

`build` serves the training job; `build_model` and `load_run` serve export, evaluation and generation, which need the
model and a checkpoint but neither the data nor the loop.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jaxtok import chat as chat_lib
from jaxtok import data as data_lib
from jaxtok import peft_format
from jaxtok import tokens as tokens_lib
from jaxtok import trainable as trainable_lib
from jaxtok.checkpoint import Checkpoints
from jaxtok.convert import load_pretrained
from jaxtok.demo import resolve_model_path
from jaxtok.errors import JaxtokError
from jaxtok.model import Llama, abstract_variables, logical_axes_of
from jaxtok.optimizer import make_optimizer
from jaxtok.peft_import import apply_adapter
from jaxtok.run_config import RunConfig, load_run_config
from jaxtok.sharding import make_mesh, tree_shardings
from jaxtok.step import TrainState, init_state, residual_buffers, state_shardings
from jaxtok.tokenizer import load_tokenizer
from jaxtok.untrained import Untrained, read_untrained
from jaxtok.untrained import report as untrained_report
from jaxtok.vocab import add_tokens, plan_rows, resolve_tokens


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


def load_base(config: RunConfig, mesh: Mesh) -> Base:
    """The base and its tokenizer, with tokens.add added to both (with model.adapter: as they are)."""
    m = config.model
    model_path = resolve_model_path(m.path)  # the demo base is built on first use
    base, params = load_pretrained(
        model_path, dtype=m.dtype, compute_dtype=m.compute_dtype, allow_pickle=m.allow_pickle, remat=m.remat,
        attention_impl=m.attention or None, loss_chunk=m.loss_chunk,
        loss_vocab_block=m.loss_vocab_block, mesh=mesh,
    )
    tokenizer = load_tokenizer(model_path)
    if config.data.chat_template:  # exported tokenizers carry the template the model was trained with
        tokenizer.chat_template = config.data.chat_template
    if m.adapter:
        return Base(base, params, tokenizer, model_path, (), base.config.vocab_size)
    descriptions = tuple(config.tokens.descriptions) or None
    params, llama_config, added = add_tokens(tokenizer, params, base.config, tuple(config.tokens.add), descriptions)
    return Base(base.clone(config=llama_config), params, tokenizer, model_path, added, base.config.vocab_size)


def build_model(config: RunConfig, mesh: Mesh, base: Optional[Base] = None, untrained: tuple[int, ...] = ()) -> Setup:
    """The model with its token rows planned, and fresh or imported adapters, on `base` (default: loaded now).
    `untrained`: ids of the base's untrained rows that train too (tokens.train_untrained)."""
    base = base or load_base(config, mesh)
    if config.model.adapter:
        return _import_adapter(config, base, mesh)
    tokenizer, params, added = base.tokenizer, base.params, base.added_ids
    llama_config, tokens = base.model.config, config.tokens
    trained = resolve_tokens(tokenizer, tuple(tokens.train), llama_config.vocab_size)
    method = trainable_lib.method(config.train.method)
    rows = plan_rows(added, trained, llama_config.tie_word_embeddings, tokens.train_head, untrained)
    rows.validate(llama_config.vocab_size, llama_config.tie_word_embeddings)
    if not method.rows:
        rows = tokens_lib.TokenRows()  # lora: the new rows stay as they start; lora+full: they train in the matrix
    elif not rows:
        raise JaxtokError(f"train.method={config.train.method} trains token rows, but tokens.add, tokens.train "
                          "and tokens.train_untrained give none; name the tokens, or choose another method")
    untrained_head = [i for i in added if not llama_config.tie_word_embeddings and i not in rows.head_ids]
    if method.rows and untrained_head and config.export.peft:
        raise JaxtokError("added tokens need trained head rows for a PEFT adapter (PEFT would give them random rows); "
                          "set tokens.train_head=added or export.peft=False")
    if not method.lora and config.export.peft:
        peft_format.standalone_targets(rows)  # PEFT's rows-only adapter must be able to hold them: fail before training
    model = base.model.clone(lora=config.lora if method.lora else None, token_rows=rows)
    params = _place_params(model, params, mesh)  # the vocabulary may have grown
    adapters = trainable_lib.init_adapters(model, params, jax.random.key(config.train.seed),
                                           _adapter_shardings(model, mesh))
    return Setup(model, {"params": params}, adapters, tokenizer, base.model_path, added, base.base_vocab, mesh,
                 new_ids=tuple(dict.fromkeys(tuple(added) + tuple(trained) + tuple(untrained))),
                 untrained_ids=tuple(untrained))


def _place_params(model: Llama, params: dict, mesh: Mesh) -> dict:
    return jax.device_put(params, tree_shardings(params, logical_axes_of(model)["params"], mesh))


def _adapter_shardings(model: Llama, mesh: Mesh):
    shapes = trainable_lib.adapters_of(nn.unbox(abstract_variables(model)))
    return tree_shardings(shapes, trainable_lib.adapters_of(logical_axes_of(model)), mesh)


def _import_adapter(config: RunConfig, loaded: Base, mesh: Mesh) -> Setup:
    """Continues from a PEFT adapter: its LoRA config and token rows replace the run config's lora and tokens."""
    if config.tokens.add or config.tokens.train:
        raise JaxtokError("model.adapter brings its own token rows; leave tokens.add and tokens.train empty")
    model, params, adapters, tokenizer = apply_adapter(config.model.adapter, loaded.model, loaded.params,
                                                       loaded.tokenizer)
    if config.data.chat_template:
        tokenizer.chat_template = config.data.chat_template
    added = tuple(i for i in model.token_rows.embed_ids if i >= loaded.base_vocab)
    params = _place_params(model, params, mesh)
    adapters = jax.device_put(adapters, _adapter_shardings(model, mesh))
    new_ids = tuple(dict.fromkeys(model.token_rows.embed_ids + model.token_rows.head_ids))
    return Setup(model, {"params": params}, adapters, tokenizer, loaded.model_path, added, loaded.base_vocab, mesh,
                 new_ids=new_ids)


def build(config: RunConfig) -> Setup:
    """Everything before the first step; on a mesh, every array is created in its shards."""
    mesh = make_mesh(config.mesh_shape)
    t, d, s = config.train, config.data, config.sample
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % batch_shards:
        raise JaxtokError(f"train.batch_size {t.batch_size} does not split over the mesh's "
                          f"data x fsdp = {batch_shards} devices; use a multiple of {batch_shards}")
    chat_template = d.chat_template or None

    def prepare_train(tokenizer):
        return data_lib.prepare(d.train, tokenizer, d.format, t.seq_len, d.packing, chat_template,
                                split=d.train_split)

    found = None
    if config.tokens.train_untrained:  # which rows train depends on the data, so the data come first
        base = load_base(config, mesh)
        train_seqs, info = prepare_train(base.tokenizer)
        found, untrained = untrained_in_data(base, train_seqs, config.model.allow_pickle)
        setup = build_model(config, mesh, base, untrained)
    else:
        setup = build_model(config, mesh)
        train_seqs, info = prepare_train(setup.tokenizer)
    if (s.calculator or s.heldout) and info["format"] != "messages":
        raise JaxtokError(f"sample.calculator and sample.heldout need chat data (messages), not {info['format']}")
    if s.heldout:  # a bad file fails now rather than after training
        chat_lib.load_questions(s.heldout, s.heldout_rows)
    eval_seqs = None
    if d.eval:
        eval_seqs, _ = data_lib.prepare(d.eval, setup.tokenizer, info["format"], t.seq_len, False, chat_template,
                                        split=d.eval_split)
    # Each process reads only the rows of a step's batch that its own devices hold (`sharding.global_batch`).
    batches = data_lib.Batches(train_seqs, t.batch_size, t.grad_accum, t.seed)
    if s.stop:  # a bad token fails now rather than after training
        stop_id(setup, s.stop)
    return dataclasses.replace(setup, chat_template=chat_template, fmt=info["format"], train_data=batches,
                               eval_sequences=eval_seqs, untrained_found=found)


def untrained_in_data(base: Base, train_seqs: dict, allow_pickle: bool = False) -> tuple[Untrained, tuple[int, ...]]:
    """(the base checkpoint's untrained rows, the ids among them that the training sequences use), for
    tokens.train_untrained. Rows of tokens.add are not counted: they train as added tokens."""
    found = read_untrained(base.model_path, allow_pickle)
    used = set(np.unique(train_seqs["tokens"][train_seqs["segment_ids"] > 0]).tolist())
    return found, tuple(i for i in found.ids if i in used and i not in base.added_ids)


def initial_state(config: RunConfig, setup: Setup) -> tuple[TrainState, dict, optax.GradientTransformation, Any]:
    """(state placed on the mesh, frozen tree, optimizer, state shardings) for a fresh run of `config`."""
    method = config.train.method
    trainable, frozen = trainable_lib.split(trainable_lib.merge(setup.frozen, setup.adapters), method)
    optimizer = make_optimizer(config.optim, trainable_lib.labels(trainable, method))
    trainable_sh = jax.tree.map(lambda x: x.sharding, trainable)
    state_sh = state_shardings(optimizer, trainable, trainable_sh, setup.mesh)
    state = jax.jit(lambda t: init_state(t, optimizer, config.train.seed), out_shardings=state_sh)(trainable)
    return state, frozen, optimizer, state_sh


def with_residual_buffers(setup: Setup, state: TrainState, state_sh: TrainState, frozen: dict
                          ) -> tuple[TrainState, TrainState]:
    """The state and its shardings with `TrainState.residuals` for the training data's batches, on a mesh of one
    device: there the step keeps its layers' residuals in memory it reuses (`jaxtok.layer_stack`). Across devices
    the step takes autodiff's residuals, because the buffers' shardings are not derived yet."""
    if setup.mesh.size != 1 or setup.train_data is None:
        return state, state_sh
    batch = {key: jax.ShapeDtypeStruct(shape, np.int32) for key, shape in setup.train_data.shapes().items()}
    residuals = residual_buffers(setup.model, state.trainable, frozen, batch)
    replicated = jax.tree.map(lambda _: state_sh.step, residuals)
    return dataclasses.replace(state, residuals=residuals), dataclasses.replace(state_sh, residuals=replicated)


def stop_id(setup: Setup, stop: str) -> int:
    """The id of sample.stop's token (default: the tokenizer's EOS)."""
    tokenizer = setup.tokenizer
    if not stop:
        return tokenizer.eos_token_id
    return resolve_tokens(tokenizer, (stop,), setup.model.config.vocab_size, key="sample.stop")[0]


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def summary(setup: Setup, config: RunConfig) -> str:
    """What the run trains, on what and with what data: the lines the job logs before its first step."""
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
    assert setup.train_data is not None, "summary() describes a setup built for training"
    return "\n".join([
        f"devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es))",
        f"model: {setup.model_path} (vocab {setup.base_vocab} -> {setup.model.config.vocab_size}, "
        f"{'tied' if setup.model.config.tie_word_embeddings else 'untied'} head, weights {config.model.dtype})",
        f"method: {t.method}",
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


def load_run(run_dir: str | Path, step: Optional[int] = None, model_path: Optional[str] = None,
             dtype: Optional[str] = None) -> tuple[RunConfig, Setup, dict, TrainState]:
    """(config, setup, frozen, state) of a run's checkpoint at `step` (default: the latest), for export and
    generation; `model_path` and `dtype` replace the run's model.path (a copy of the base elsewhere) and model.dtype."""
    run_dir = Path(run_dir)
    if not (run_dir / "run_config.json").is_file():
        raise JaxtokError(f"{run_dir} is not a jaxtok run directory (no run_config.json); pass a run's output_dir")
    saved = load_run_config(run_dir / "run_config.json")
    if model_path:
        saved.model.path = model_path
    if dtype:
        saved.model.dtype, saved.model.compute_dtype = dtype, None
    config = RunConfig.of(saved)
    checkpoints = Checkpoints(run_dir / "checkpoints")
    try:
        steps = checkpoints.steps()
        if not steps:
            raise JaxtokError(f"{run_dir} has no checkpoints yet")
        if step is not None and step not in steps:
            raise JaxtokError(f"{run_dir} has no checkpoint at step {step}; it has {sorted(steps)}")
        untrained = tuple(checkpoints.record(step).get("untrained", ())) if config.tokens.train_untrained else ()
        setup = build_model(config, make_mesh(config.mesh_shape if jax.process_count() > 1 else (1, -1, 1)),
                            untrained=untrained)
        like, frozen, _, _ = initial_state(config, setup)
        state, _ = checkpoints.restore(like, step)
    finally:
        checkpoints.close()
    return config, setup, frozen, state
