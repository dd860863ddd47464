"""The training job: a run config in, a trained adapter, a merged checkpoint and a metrics log out.

`run(config)` builds the run (`jaxtok.setup`), then trains with evaluation before the first step, every
`train.eval_every` steps and after the last, checkpoints every `train.save_every` steps and at the end, and finally
writes the PEFT adapter, the merged checkpoint and the sample (`jaxtok.finish`).

Resuming: started again on an `output_dir` that holds checkpoints, the job restores the latest and continues. The
data order is a function of (seed, step) and the RNG and optimizer state are in the checkpoint, so a killed and
resumed run ends with the same adapter as one never interrupted.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxtok import trainable as trainable_lib
from jaxtok.checkpoint import Checkpoints
from jaxtok.errors import JaxtokError, Stopped
from jaxtok.evaluate import evaluate_sequences
from jaxtok.finish import finish
from jaxtok.metrics import MetricsWriter, drop_after
from jaxtok.optimizer import schedule
from jaxtok.run_config import RunConfig, TrainSection
from jaxtok.run_lock import RunLock
from jaxtok.setup import Setup, build, initial_state, summary, with_residual_buffers
from jaxtok.sharding import RULES, batch_sharding, global_array, global_batch, initialize_distributed
from jaxtok.step import TrainState, make_train_step
from jaxtok.stop import StopSignals


def run(config: Union[ml_collections.ConfigDict, RunConfig]) -> dict:
    """Runs (or resumes) the job; returns the final evaluation and step metrics."""
    config = RunConfig.of(config)
    d = config.distributed
    initialize_distributed(d.coordinator, d.num_processes, d.process_id, d.auto)
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


def _hold(lock: RunLock, log: Callable[[str], None]) -> None:
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


def _run(config: RunConfig, out: Path, log: Callable[[str], None]) -> dict:
    setup = build(config)
    is_main = jax.process_index() == 0
    log(summary(setup, config))

    if is_main:
        (out / "run_config.json").write_text(config.to_json())
        setup.tokenizer.save_pretrained(str(out / "tokenizer"))
    state, frozen, optimizer, state_sh = initial_state(config, setup)
    state, state_sh = with_residual_buffers(setup, state, state_sh, frozen)
    optim = config.optim
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    step_fn = make_train_step(setup.model, optimizer, schedule(optim, optim.lr),
                              shardings=(state_sh, frozen_sh, batch_sharding(setup.mesh)))

    checkpoints = Checkpoints(out / "checkpoints", config.train.keep_checkpoints)
    record = {"token_rows": [list(setup.model.token_rows.embed_ids), list(setup.model.token_rows.head_ids)],
              "vocab_size": setup.model.config.vocab_size, "method": config.train.method}
    if setup.untrained_ids:  # load_run rebuilds the token rows from it, without the data
        record["untrained"] = list(setup.untrained_ids)
    state, start = _resume(checkpoints, state, record, out, log)
    drop_after(out, start)
    writer = MetricsWriter(out, tensorboard=config.train.tensorboard)
    try:
        with StopSignals() as stop:
            loop = _Loop(config.train, setup, state, frozen, step_fn, checkpoints, writer, record, log, stop)
            state, final = loop.run(start)
    finally:
        writer.close()
        checkpoints.close()
    finish(config, setup, frozen, state, out, log)
    return final


def _resume(checkpoints: Checkpoints, state: TrainState, record: dict, out: Path,
            log: Callable[[str], None]) -> tuple[TrainState, int]:
    """(state, step) of the newest checkpoint that restores, if it is of the same run; else (state, 0)."""
    restored = checkpoints.restore_newest(state, log)  # one that does not restore is moved aside, with a warning
    if restored is None:
        return state, 0
    state, saved = restored
    same = all(saved.get(k, "lora+rows" if k == "method" else None) == v for k, v in record.items())
    if not same:
        raise JaxtokError(f"{out} holds checkpoints of a run with another method, token rows or vocabulary; "
                          "use another output_dir or remove its checkpoints")
    log(f"resuming from the checkpoint at step {int(state.step)}")
    return state, int(state.step)


def evaluate_setup(setup: Setup, variables: dict, batch_size: int) -> Optional[dict]:
    """Evaluation loss and new-token accuracy on the run's eval data (None without data.eval)."""
    if setup.eval_sequences is None:
        return None
    sharding = NamedSharding(setup.mesh, PartitionSpec(RULES["batch"], None))
    return evaluate_sequences(setup.model, variables, setup.eval_sequences, batch_size, progress=False,
                              place=lambda rows: global_array(rows, sharding), new_ids=setup.new_ids)


class _Loop:
    """The training loop's moving parts: the state, its metrics on their way to the log, evaluation, saving."""

    def __init__(self, t: TrainSection, setup: Setup, state: TrainState, frozen: dict, step_fn,
                 checkpoints: Checkpoints, writer: MetricsWriter, record: dict, log: Callable[[str], None],
                 stop: StopSignals):
        self.t, self.setup, self.state, self.frozen = t, setup, state, frozen
        self.step_fn, self.checkpoints, self.writer, self.record, self.log = step_fn, checkpoints, writer, record, log
        self.stop = stop
        self.final: dict = {}
        self.pending: list[tuple[int, dict]] = []
        self.last_good = checkpoints.latest_step()
        self.batch_sharding = batch_sharding(setup.mesh)

    def due(self, step: int, every: int) -> bool:
        return every > 0 and step % every == 0

    def evaluate(self, step: int) -> None:
        result = evaluate_setup(self.setup, trainable_lib.merge(self.frozen, self.state.trainable), self.t.batch_size)
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
        t = self.t
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
        t, due = self.t, self.due
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
        train_data = self.setup.train_data
        assert train_data is not None  # a training run's setup comes from build(), which always reads the data
        epoch = train_data.epoch_of(done)
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


