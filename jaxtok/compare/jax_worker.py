"""The jaxtok side of a comparison: build the run as the main job does, write the shared start, train, evaluate."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from jaxtok import compare
from jaxtok import tokens as tokens_lib
from jaxtok import trainable as trainable_lib
from jaxtok.export import export_merged, export_peft
from jaxtok.optimizer import schedule
from jaxtok.run_config import RunConfig
from jaxtok.setup import Setup, build, initial_state
from jaxtok.sharding import batch_sharding, global_batch
from jaxtok.step import make_train_step
from jaxtok.train import evaluate_setup


def eval_steps(steps: int, every: int) -> list[int]:
    """Before the first step, every `every` steps (0: never between), and after the last."""
    between = range(every, steps, every) if every > 0 else []
    return [0, *between, steps]


def write_start(start: Path, config: RunConfig, setup: Setup) -> None:
    """The files `jaxtok.compare` describes, for the state `setup` starts from."""
    start.mkdir(parents=True, exist_ok=True)
    bare = setup.model.clone(lora=None, token_rows=tokens_lib.TokenRows())
    export_merged(start / "base", bare, setup.frozen["params"], {}, tokenizer=setup.tokenizer, dtype="float32",
                  overwrite=True)
    if setup.model.lora is not None or setup.model.token_rows:
        # added_ids=(): the start's base already has the added tokens' rows
        export_peft(start / "adapter", setup.model, jax.device_get(setup.adapters), str(start / "base"),
                    overwrite=True)
    t = config.train
    data, eval_sequences = setup.train_data, setup.eval_sequences
    assert data is not None and eval_sequences is not None  # run() builds the setup, with data.eval
    train = [data.batch(step) for step in range(t.steps)]
    arrays = {f"train_{k}": np.stack([b[k] for b in train]) for k in compare.DATA_KEYS}
    arrays.update({f"eval_{k}": np.asarray(eval_sequences[k]) for k in compare.DATA_KEYS})
    # numpy's stubs let a ** of str keys reach savez's allow_pickle: bool
    np.savez(start / "data.npz", **arrays)  # type: ignore[arg-type]
    optim = config.optim
    multiplier = schedule(optim, 1.0)
    plan = dict(
        method=t.method, steps=t.steps, eval_steps=eval_steps(t.steps, t.eval_every), eval_batch_size=t.batch_size,
        lr_multipliers=[float(multiplier(k)) for k in range(t.steps)],
        groups={"lora": dict(lr=optim.lr, weight_decay=optim.weight_decay),
                "tokens": dict(lr=optim.lr if optim.token_lr is None else optim.token_lr,
                               weight_decay=optim.token_weight_decay),
                "embeddings": dict(lr=optim.lr, weight_decay=optim.weight_decay)},
        betas=[optim.b1, optim.b2], eps=optim.eps, max_grad_norm=optim.max_grad_norm,
        new_ids=list(setup.new_ids), tied=setup.model.config.tie_word_embeddings, lora_dropout=config.lora.dropout,
        seed=t.seed,
    )
    (start / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")


def run(config: RunConfig, start: Path, train: bool = True) -> dict | None:
    """Writes the start of `config`'s method under `start`; with `train`, trains it and returns its result."""
    if not config.data.eval:
        from jaxtok.errors import JaxtokError

        raise JaxtokError("a comparison evaluates before and after training: set data.eval")
    setup = build(config)
    write_start(start, config, setup)
    if not train:
        return None
    state, frozen, optimizer, state_sh = initial_state(config, setup)
    optim = config.optim
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    sharding = batch_sharding(setup.mesh)
    step_fn = make_train_step(setup.model, optimizer, schedule(optim, optim.lr), shardings=(state_sh, frozen_sh,
                                                                                              sharding))
    steps, evals_at = config.train.steps, eval_steps(config.train.steps, config.train.eval_every)
    evals, losses, times = [], [], []

    def evaluate(step: int) -> None:
        result = evaluate_setup(setup, trainable_lib.merge(frozen, state.trainable), config.train.batch_size)
        assert result is not None  # there is eval data: checked above
        evals.append(dict(step=step, eval_loss=result["eval_loss"], new_token_acc=result["new_token_acc"]))

    evaluate(0)
    compare.report_progress(0, steps)
    for step in range(steps):
        batch = global_batch(setup.train_data, step, sharding)
        begin = time.perf_counter()
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - begin)
        if step + 1 in evals_at[1:]:
            evaluate(step + 1)
        compare.report_progress(step + 1, steps)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    return dict(
        framework="jaxtok", method=config.train.method, trainable_params=count(state.trainable),
        eval_loss_before=evals[0]["eval_loss"], eval_loss_after=evals[-1]["eval_loss"],
        new_token_acc_before=evals[0]["new_token_acc"], new_token_acc_after=evals[-1]["new_token_acc"],
        step_ms=1000 * statistics.median(times[1:] or times),  # the first step compiles
        peak_memory_mb=compare.peak_memory_mb(), losses=losses, evals=evals, device=jax.devices()[0].device_kind,
    )
