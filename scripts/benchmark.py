"""Training-step speed and memory of jaxtok against Hugging Face PEFT, on named model shapes, rerunnable and comparable.

    python scripts/benchmark.py                                   # shape S, both frameworks, all variants, float32
    python scripts/benchmark.py --shape S,M --repeats 5           # several shapes, more repeats
    python scripts/benchmark.py --shape 1b --dtype bfloat16 --frameworks jaxtok          # on one GPU: < 8 minutes
    python scripts/benchmark.py --shape tiny --repeats 1 --steps 1 --warmup 1 --out /tmp/b  # a smoke test
    python scripts/benchmark.py --shape M --variants lora --dtype float32,bfloat16 --remat none,full,dots  # a sweep

Shapes (random weights, built here: nothing is downloaded; every head is tied to the embedding, as in Llama 3.2):

    shape  hidden layers heads(q/kv) head_dim  mlp    vocab    batch
    tiny   32     2      4/2         8         96     1,000    2 x 16
    S      256    4      8/2         32        768    128,256  4 x 256
    M      1024   8      16/4        64        4096   32,000   2 x 512
    1b     2048   16     32/8        64        8192   128,256  1 x 512   (Llama-3.2-1B's shape)

Variants, each trained with AdamW (lr 1e-4, no weight decay, gradients clipped to norm 1) on one fixed batch of
random tokens (numpy, seeded: the same tokens in both frameworks; every 7th is one of the trained ids), with the loss
on every token:

    lora       LoRA r=16, alpha=32 on every linear layer but the head (PEFT's target_modules="all-linear")
    lora+rows  plus 4 trainable token rows, ids 100..103 (jaxtok: TokenRows; PEFT: trainable_token_indices)
    lora+full  plus the whole (tied) embedding/head (jaxtok: method lora+full; PEFT:
               requires_grad_(True) on the embedding weight after get_peft_model, which trains the tied head too)

jaxtok builds `Llama(config, lora=..., token_rows=...)` with seeded normal(0, 0.02) weights (numpy: a block of 4M
values repeated over each weight, as the speed depends on their scale only; in `--dtype`, adapters float32) and
steps with `jaxtok.step.make_train_step` (compiled once, ahead of time, on one device). PEFT builds
`transformers.LlamaForCausalLM(LlamaConfig(...))` of the same shape (seeded random init, model in `--dtype`,
adapters as PEFT makes them, torch threads = CPU count), wraps it with `peft.get_peft_model` and steps eagerly, on
the chip jax runs on: the CPU, or the first GPU where jax runs on a GPU and torch has CUDA (elsewhere PEFT is
skipped, and the output says so). Float32 matmuls use each framework's default precision (on a GPU JAX's may be
TF32, torch's is not).

Settings. `--dtype` and `--remat` take comma-separated lists; every combination of shape, dtype and remat policy is
a setting of its own, with its own rows, so one run measures what bf16 and remat cost or save. PEFT runs remat
"full" as `gradient_checkpointing_enable()` (non-reentrant: each decoder layer is recomputed in the backward); it has
no counterpart of "dots", so that setting runs jaxtok only.

Method. Every (framework, variant) runs in a process of its own: the script re-invokes itself with a hidden
`--worker` flag and reads back one JSON line, so no run inherits another's caches, threads or memory. Runs are
interleaved: repeat 1 runs every shape x variant x framework once, then repeat 2, ..., so load on a shared machine hits
all of them alike. Within a process, `--warmup` steps (after compilation) are run untimed, then `--steps` steps are
timed one by one (waiting for each to finish). Each repeat also starts a worker that measures the machine's matmul
speed (a jitted matmul in the benchmark's dtype: 1024x1024 @ 1024x4096 on CPU, 8192^3 on an accelerator). Compiled
XLA programs are cached under `OUT/xla_cache`, so repeats after the first compile faster (compile time is never in
the step time).

Columns of results.md (results.json holds the same per row, plus every repeat's numbers):

    dtype, remat  the setting: base weights and compute dtype; gradient checkpointing policy
    ms/step       median over repeats of each process's median step time
    tokens/s      batch x seq_len / step time
    / PEFT        jaxtok's ms/step / PEFT's ms/step for the same variant (below 1: jaxtok is faster)
    / lora        this variant's ms/step / the same framework's lora ms/step
    peak RSS      the worker's peak resident memory (ru_maxrss), MiB, max over repeats; includes the framework itself
    XLA temp      jaxtok only: the compiled step's temporary buffers (memory_analysis().temp_size_in_bytes) plus the
                  layers' residual buffers it reuses from step to step (TrainState.residuals), MiB
    device peak   on an accelerator only: peak device memory in use, MiB, weights included (jaxtok: the device's
                  memory_stats()["peak_bytes_in_use"]; PEFT: torch.cuda.max_memory_allocated)
    trainable     number of trained parameters (a check that both frameworks train the same thing)
    GFLOP/step    model FLOPs of one step, counted analytically by `step_flops` (its docstring says what counts)
    GFLOP/s       GFLOP/step / step time
    % matmul      GFLOP/s as a share of the matmul speed measured in the same run, in the row's dtype (median
                  over repeats)
    MFU           on an accelerator only: GFLOP/s as a share of the chip's dense bf16 peak (PEAK_BF16_FLOPS; blank
                  for a chip not listed there)

Bad input (an unknown shape, variant, framework or option value; torch, transformers or peft not installed when
PEFT is asked for) prints one `error: ...` line and exits with status 2. A worker that fails is reported in the
table and results.json (with the end of its stderr), the other runs go on, and the script exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jaxtok.cli import comma_names, run_main  # noqa: E402  (jax-free: the parent process never starts a JAX backend)
from jaxtok.errors import JaxtokError  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int  # D
    layers: int  # L
    heads: int  # N
    kv_heads: int  # K
    head_dim: int  # H
    mlp: int  # F
    vocab: int  # V
    batch: int  # B
    seq_len: int  # T

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


SHAPES = {
    "tiny": Shape(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=96, vocab=1000, batch=2, seq_len=16),
    "S": Shape(hidden=256, layers=4, heads=8, kv_heads=2, head_dim=32, mlp=768, vocab=128_256, batch=4, seq_len=256),
    "M": Shape(hidden=1024, layers=8, heads=16, kv_heads=4, head_dim=64, mlp=4096, vocab=32_000, batch=2, seq_len=512),
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128_256, batch=1,
                seq_len=512),
}
VARIANTS = ("lora", "lora+rows", "lora+full")
FRAMEWORKS = ("jaxtok", "peft")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "dots")
ATTENTIONS = ("", "xla", "cudnn")
RANK, ALPHA, LR, MAX_GRAD_NORM, SEED = 16, 32.0, 1e-4, 1.0, 0
TOKEN_IDS = (100, 101, 102, 103)
# Dense bf16 peak FLOP/s per chip, by jax's device_kind (vendor data sheets, without sparsity).
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}
RESULT_MARKER = "BENCHMARK_RESULT "


# ------------------------------------------------------------------------------------------------------------ FLOPs


class Flops(NamedTuple):
    forward: int
    input_grads: int  # the backward's gradients with respect to activations
    weight_grads: int  # the backward's gradients with respect to trained weights

    @property
    def step(self) -> int:
        return self.forward + self.input_grads + self.weight_grads


def step_flops(shape: Shape, variant: str, rank: int = RANK, rows: int = len(TOKEN_IDS)) -> Flops:
    """Model FLOPs of one training step, counting matrix products only (2 FLOPs per multiply-add).

    With tokens = B*T, per layer the frozen linear weights frozen = D*N*H (q) + 2*D*K*H (k, v) + N*H*D (o) + 3*D*F
    (mlp) and the LoRA weights lora = R * sum over those 7 maps of (I + O):

        forward      2*tokens*(L*(frozen + lora) + V*D)  +  attention, 4*B*T*T*N*H per layer (scores = queries .
                     keys^T, and probabilities . values)
        input grads  2*tokens*(L*(frozen + lora) + V*D)  +  2 * attention (its backward has 4 products: the gradients
                     of queries, keys, values and probabilities)
        weight grads 2*tokens*L*lora                    (LoRA's A and B)
                     + 2*tokens*rows*D                  (lora+rows: the trained rows of the tied head)
                     + 2*tokens*V*D                     (lora+full: the whole tied head)

    Attention is counted in full (T x T), not as a causal half, since the masked XLA kernel computes all of it. Not
    counted: norms, RoPE, softmax, the optimizer, the embedding lookup and its scatter-add gradient, and work an
    implementation chooses to do again (remat recomputes layers). The first layer's input gradient is counted although
    LoRA alone does not need it (within 1/L).
    """
    if variant not in VARIANTS:
        raise JaxtokError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    D, F, L, V = shape.hidden, shape.mlp, shape.layers, shape.vocab
    N, K, H, tokens = shape.heads, shape.kv_heads, shape.head_dim, shape.tokens
    frozen = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    lora = rank * ((D + N * H) + 2 * (D + K * H) + (N * H + D) + 2 * (D + F) + (F + D))
    attention = 4 * shape.batch * shape.seq_len * shape.seq_len * N * H * L
    matmuls = 2 * tokens * (L * (frozen + lora) + V * D)
    weight_grads = 2 * tokens * L * lora
    if variant == "lora+rows":
        weight_grads += 2 * tokens * rows * D
    elif variant == "lora+full":
        weight_grads += 2 * tokens * V * D
    return Flops(matmuls + attention, matmuls + 2 * attention, weight_grads)


# ---------------------------------------------------------------------------------------------------------- workers


def token_batch(shape: Shape, seed: int = SEED):
    """[B, T] int32 random tokens, the same in both frameworks; every 7th is one of the trained ids."""
    import numpy as np

    batch = np.random.default_rng(seed).integers(0, shape.vocab, (shape.batch, shape.seq_len)).astype(np.int32)
    batch[:, ::7] = np.resize(np.asarray(TOKEN_IDS, np.int32), batch[:, ::7].shape)
    return batch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed_steps(run, warmup: int, steps: int) -> list[float]:
    """Runs `run()` (which must wait for its step to finish) warmup times, then returns `steps` timings in seconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def jaxtok_worker(spec: dict) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    if spec["cache_dir"]:
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    from jaxtok import trainable
    from jaxtok.llama_config import LlamaConfig
    from jaxtok.lora import LoraConfig
    from jaxtok.model import Llama, abstract_params
    from jaxtok.optimizer import OptimConfig, make_optimizer, schedule
    from jaxtok.step import init_state, make_train_step, residual_buffers
    from jaxtok.tokens import TokenRows

    s, variant = SHAPES[spec["shape"]], spec["variant"]
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.mlp, num_layers=s.layers,
                         num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim, tie_word_embeddings=True,
                         max_position_embeddings=max(s.seq_len, 2048))
    dtype = jnp.dtype(spec["dtype"])
    model = Llama(config, dtype=dtype, param_dtype=dtype, lora=LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear"),
                  token_rows=TokenRows(TOKEN_IDS if variant == "lora+rows" else ()), remat=spec["remat"],
                  attention_impl=spec["attention"] or None, loss_chunk=spec["loss_chunk"],
                  loss_vocab_block=spec["loss_vocab_block"])

    def draw(path, leaf):  # norm scales one, other weights normal(0, 0.02): a seeded block repeated over the leaf
        if getattr(path[-1], "key", None) == "scale":
            return jax.device_put(np.ones(leaf.shape, leaf.dtype))
        return jax.device_put(np.resize(block.astype(leaf.dtype), leaf.shape))

    # Set-up uses numpy and a few jitted functions, no eager jax ops: each of those would be a compilation of its own.
    start = time.perf_counter()
    block = 0.02 * np.random.default_rng(SEED).standard_normal(2**22 + 1, np.float32)  # odd length: no row repeats
    params = jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(model)))
    adapters = trainable.init_adapters(model, params, jax.random.key(SEED))
    train, frozen = trainable.split({"params": params, **adapters}, variant)  # the variants are jaxtok's methods
    del params, adapters
    optim = OptimConfig(lr=LR, schedule="constant", max_grad_norm=MAX_GRAD_NORM)
    optimizer = make_optimizer(optim, trainable.labels(train, variant))
    trainable_params = sum(x.size for x in jax.tree.leaves(train))
    state = jax.jit(lambda train: init_state(train, optimizer, SEED))(train)
    del train
    tokens = token_batch(s)[None]  # [A=1, B, T]
    positions = np.broadcast_to(np.arange(s.seq_len, dtype=np.int32), tokens.shape)
    batch = jax.device_put(dict(tokens=tokens, positions=positions, segment_ids=np.ones_like(tokens),
                                loss_mask=np.ones_like(tokens)))
    if jax.device_count() == 1:  # as scripts/train.py runs on one device (jaxtok.setup.with_residual_buffers)
        state = state.replace(residuals=residual_buffers(model, state.trainable, frozen, batch))
    residual_bytes = sum(x.nbytes for x in jax.tree.leaves(state.residuals))
    compile_start = time.perf_counter()
    step = make_train_step(model, optimizer, schedule(optim, optim.lr)).lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - compile_start
    memory = step.memory_analysis()
    box = [state, None]

    def run() -> None:
        box[0], box[1] = step(box[0], frozen, batch)
        jax.block_until_ready(box)

    times = timed_steps(run, spec["warmup"], spec["steps"])
    stats = jax.local_devices()[0].memory_stats() or {}
    return dict(
        step_times_s=times, setup_s=compile_start - start, compile_s=compile_s, loss=float(box[1]["loss"]),
        trainable_params=int(trainable_params), peak_rss_mib=peak_rss_mib(),
        xla_temp_mib=(memory.temp_size_in_bytes + residual_bytes) / 2**20 if memory is not None else None,
        device_peak_mib=stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None,
        device=jax.local_devices()[0].device_kind,
    )


def peft_worker(spec: dict) -> dict:
    import peft
    import torch
    import transformers

    s, variant = SHAPES[spec["shape"]], spec["variant"]
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(SEED)
    device = spec["device"]  # "cuda" where jax runs on a GPU, else "cpu": both frameworks on the same chip
    start = time.perf_counter()
    config = transformers.LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.mlp, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim, tie_word_embeddings=True,
        max_position_embeddings=max(s.seq_len, 2048),
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(getattr(torch, spec["dtype"]))
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                           trainable_token_indices=list(TOKEN_IDS) if variant == "lora+rows" else None)
    model = peft.get_peft_model(model, lora)
    if variant == "lora+full":
        model.get_input_embeddings().weight.requires_grad_(True)  # tied: the head is this same tensor
    if spec["remat"] == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    tokens = torch.tensor(token_batch(s), dtype=torch.long, device=device)
    losses = []

    def run() -> None:
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        losses.append(loss.detach())
        if device == "cuda":
            torch.cuda.synchronize()

    setup_s = time.perf_counter() - start
    times = timed_steps(run, spec["warmup"], spec["steps"])
    return dict(
        step_times_s=times, setup_s=setup_s, compile_s=None, loss=float(losses[-1]),
        trainable_params=sum(p.numel() for p in params), peak_rss_mib=peak_rss_mib(),
        xla_temp_mib=None, device_peak_mib=torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        attn_implementation=model.config._attn_implementation,
    )


def matmul_worker(spec: dict) -> dict:
    """The machine's matmul speed in the benchmark's dtype (GFLOP/s, median of timed runs), and what it runs on."""
    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    m, k, n = (1024, 1024, 4096) if backend == "cpu" else (8192, 8192, 8192)
    ka, kb = jax.random.split(jax.random.key(SEED))
    a = jax.random.normal(ka, (m, k), spec["dtype"])
    b = jax.random.normal(kb, (k, n), spec["dtype"])
    matmul = jax.jit(jnp.matmul)
    per_timing = 1 if backend == "cpu" else 10  # queued back to back: no launch gaps in an accelerator's timing

    def run() -> None:
        for _ in range(per_timing):
            c = matmul(a, b)
        c.block_until_ready()

    times = timed_steps(run, 2, 10)
    return dict(gflops=2 * m * k * n * per_timing / statistics.median(times) / 1e9, size=[m, k, n], backend=backend,
                device_kind=jax.devices()[0].device_kind, device_count=jax.device_count())


WORKERS = {"jaxtok": jaxtok_worker, "peft": peft_worker, "matmul": matmul_worker}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = WORKERS[spec["kind"]](spec)
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_worker(spec: dict) -> dict:
    """Runs one worker process; its result, or {"error": ...}. A worker's user error (exit 2) is raised here."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode == 0 and found:
        return json.loads(found[-1][len(RESULT_MARKER):])
    lines = proc.stderr.strip().splitlines() or ["(no output)"]
    if proc.returncode == 2 and lines[-1].startswith("error: "):
        raise JaxtokError(lines[-1][len("error: "):])
    exception = next((line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception)\b", line)), lines[-1])
    rc = proc.returncode
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    return {"error": f"{how}: {exception}", "stderr_tail": lines[-20:]}


# ------------------------------------------------------------------------------------------------------- the report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, Optional[str]]:
    out = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def setting_name(shape: str, dtype: str, remat: str) -> str:
    return f"{shape}/{dtype}/remat={remat}"


def summarize(key: tuple[str, str, str, str, str], runs: list[dict], matmul_gflops: Optional[float],
              peak_flops: Optional[float]) -> dict:
    """One row of results: medians over the repeats that succeeded, and every run as it came."""
    shape_name, dtype, remat, framework, variant = key
    shape = SHAPES[shape_name]
    flops = step_flops(shape, variant)
    good = [r for r in runs if "error" not in r]
    row = dict(shape=shape_name, dtype=dtype, remat=remat, setting=setting_name(shape_name, dtype, remat),
               framework=framework, variant=variant, flops_per_step=flops.step,
               forward_flops=flops.forward, runs=runs, failed_runs=len(runs) - len(good),
               error=None if good else (runs[-1].get("error") if runs else None))
    if not good:
        return row
    seconds = median([statistics.median(r["step_times_s"]) for r in good])
    row.update(
        ms_per_step=1000 * seconds, tokens_per_s=shape.tokens / seconds, gflops=flops.step / seconds / 1e9,
        peak_rss_mib=max(r["peak_rss_mib"] for r in good),
        xla_temp_mib=max((r["xla_temp_mib"] for r in good if r["xla_temp_mib"] is not None), default=None),
        device_peak_mib=max((r["device_peak_mib"] for r in good if r["device_peak_mib"] is not None), default=None),
        trainable_params=good[0]["trainable_params"], loss=good[0]["loss"],
        compile_s=median([r["compile_s"] for r in good]), setup_s=median([r["setup_s"] for r in good]),
        pct_matmul_peak=100 * flops.step / seconds / 1e9 / matmul_gflops if matmul_gflops else None,
        mfu=100 * flops.step / seconds / peak_flops if peak_flops else None,
    )
    return row


def ratios(rows: list[dict]) -> dict:
    """Per setting: jaxtok/peft per variant, and rows/lora and full/lora per framework (None where a run failed)."""
    ms = {(r["setting"], r["framework"], r["variant"]): r.get("ms_per_step") for r in rows}

    def ratios_of(pairs) -> dict:
        return {name: ms[a] / ms[b] if ms[a] and ms[b] else None for name, a, b in pairs if a in ms and b in ms}

    return {s: {
        "jaxtok/peft": ratios_of((v, (s, "jaxtok", v), (s, "peft", v)) for v in VARIANTS),
        "rows/lora": ratios_of((f, (s, f, "lora+rows"), (s, f, "lora")) for f in FRAMEWORKS),
        "full/lora": ratios_of((f, (s, f, "lora+full"), (s, f, "lora")) for f in FRAMEWORKS),
    } for s in dict.fromkeys(r["setting"] for r in rows)}


def fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    v = ", ".join(f"{k} {x}" for k, x in report["versions"].items() if x)
    accelerator = m["backend"] != "cpu"
    host = f", host {m['cpu']} ({m['cpu_count']} cores)" if accelerator else ""
    lines = [
        "## jaxtok vs PEFT: training step", "",
        f"- machine: {m['name']} (jax backend {m['backend']}){host}",
        f"- versions: {v}",
        f"- date: {report['date']}",
        f"- settings: {s['repeats']} repeats x ({s['warmup']} warmup + {s['steps']} timed steps); "
        f"LoRA r={RANK} alpha={ALPHA:g} all-linear; rows: ids {TOKEN_IDS[0]}..{TOKEN_IDS[-1]}; jaxtok: "
        f"attention {s['attention'] or 'default'}, loss chunk {s['loss_chunk'] or 'auto'}, "
        f"loss vocabulary block {s['loss_vocab_block'] or 'auto'}",
    ]
    for dtype, matmul in report["matmul"].items():
        lines.append(f"- matmul peak, {dtype}: {fmt(matmul['gflops'], ',.1f')} GFLOP/s "
                     f"({' x '.join(map(str, matmul['size']))}, median over repeats)")
    if report["peak_flops"]:
        lines.append(f"- the chip's dense bf16 peak: {report['peak_flops'] / 1e12:g} TFLOP/s")
    lines += [f"- note: {note}" for note in report["notes"]]
    columns = ["shape", "dtype", "remat", "framework", "variant", "ms/step", "tokens/s", "/ PEFT", "/ lora",
               "peak RSS MiB", "XLA temp MiB"] + (["device peak MiB"] if accelerator else []) + [
               "trainable", "GFLOP/step", "GFLOP/s", "% matmul"] + (["MFU %"] if accelerator else [])
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in report["results"]:
        r = report["ratios"][row["setting"]]
        vs_peft = r["jaxtok/peft"].get(row["variant"]) if row["framework"] == "jaxtok" else None
        vs_lora = {"lora+rows": r["rows/lora"], "lora+full": r["full/lora"]}.get(row["variant"], {}).get(
            row["framework"])
        if row["error"]:
            cells = ["failed: " + row["error"][:80]] + [""] * (len(columns) - 6)
        else:
            cells = [fmt(row["ms_per_step"], ".1f"), fmt(row["tokens_per_s"], ",.0f"), fmt(vs_peft, ".2f"),
                     fmt(vs_lora, ".2f"), fmt(row["peak_rss_mib"], ",.0f"), fmt(row["xla_temp_mib"], ",.1f")]
            cells += [fmt(row["device_peak_mib"], ",.0f")] if accelerator else []
            cells += [f"{row['trainable_params']:,}", fmt(row["flops_per_step"] / 1e9, ",.2f"),
                      fmt(row["gflops"], ",.1f"), fmt(row["pct_matmul_peak"], ".1f")]
            cells += [fmt(row["mfu"], ".1f")] if accelerator else []
        names_ = [row["shape"], row["dtype"], row["remat"], row["framework"], row["variant"]]
        lines.append("| " + " | ".join(names_ + cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help=f"{', '.join(SHAPES)}; comma-separated or repeated (S)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="jaxtok,peft or either alone")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="any of " + ",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians over them (3)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process, after compilation (2)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or both (comma-separated): base weights "
                        "and compute")
    parser.add_argument("--remat", default="none", help="none, full, dots, or several (comma-separated); PEFT runs "
                        "full as gradient checkpointing and skips dots")
    parser.add_argument("--attention", default="", help='jaxtok only: "" (jaxtok\'s causal query blocks), or '
                        "JAX's xla or cudnn")
    parser.add_argument("--loss-chunk", type=int, default=0, help="jaxtok only: positions per loss chunk (lora+full); "
                        "0 = auto")
    parser.add_argument("--loss-vocab-block", type=int, default=0, help="jaxtok only: head rows per loss block (lora, "
                        "lora+rows); 0 = auto")
    parser.add_argument("--out", default="runs/benchmark", help="writes OUT/results.json and OUT/results.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker_main(args.worker)
    shapes = comma_names(",".join(args.shape or ["S"]), SHAPES, "shape")
    frameworks = comma_names(args.frameworks, FRAMEWORKS, "framework")
    variants = comma_names(args.variants, VARIANTS, "variant")
    dtypes = comma_names(args.dtype, DTYPES, "dtype")
    remats = comma_names(args.remat, REMATS, "remat policy")
    if args.attention not in ATTENTIONS:
        raise JaxtokError(f"unknown attention {args.attention!r}; choose from {', '.join(map(repr, ATTENTIONS))}")
    for name in ("repeats", "steps"):
        if getattr(args, name) < 1:
            raise JaxtokError(f"--{name} must be at least 1")
    if min(args.warmup, args.loss_chunk, args.loss_vocab_block) < 0:
        raise JaxtokError("--warmup, --loss-chunk and --loss-vocab-block must be >= 0")
    if "peft" in frameworks:
        missing = [p for p in ("torch", "transformers", "peft") if importlib.util.find_spec(p) is None]
        if missing:
            raise JaxtokError(f"{', '.join(missing)} not installed: `pip install -e \".[test]\"`, or run "
                              f"--frameworks jaxtok")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(attention=args.attention, loss_chunk=args.loss_chunk, loss_vocab_block=args.loss_vocab_block,
                  warmup=args.warmup, steps=args.steps,
                  cache_dir=str((out / "xla_cache").resolve()))

    notes, machine = [], None
    matmuls: dict[str, list[dict]] = {dtype: [] for dtype in dtypes}
    # (shape, dtype, remat, framework, variant); PEFT has no counterpart of remat "dots"
    runs: dict[tuple[str, str, str, str, str], list[dict]] = {
        (s, d, r, f, v): [] for s in shapes for d in dtypes for r in remats for v in variants for f in frameworks
        if not (f == "peft" and r == "dots")}
    for repeat in range(1, args.repeats + 1):
        for dtype in dtypes:
            matmul = run_worker(dict(kind="matmul", dtype=dtype, **common))
            if "error" in matmul:
                raise RuntimeError(f"the matmul worker failed: {matmul['error']}")
            matmuls[dtype].append(matmul)
            print(f"[{repeat}/{args.repeats}] matmul {dtype}: {matmul['gflops']:,.1f} GFLOP/s on "
                  f"{matmul['device_kind']}", file=sys.stderr, flush=True)
        if machine is None:
            machine = matmul
            device, skip = peft_device(machine["backend"]) if "peft" in frameworks else ("cpu", None)
            if skip:
                notes.append(skip)
                frameworks = [f for f in frameworks if f != "peft"]
                runs = {key: r for key, r in runs.items() if key[3] != "peft"}
        for (shape, dtype, remat, framework, variant), results in runs.items():
            result = run_worker(dict(kind=framework, shape=shape, dtype=dtype, remat=remat, variant=variant,
                                     device=device, **common))
            results.append(result)
            said = result.get("error") or f"{1000 * statistics.median(result['step_times_s']):.1f} ms/step"
            print(f"[{repeat}/{args.repeats}] {setting_name(shape, dtype, remat)} {framework} {variant}: {said}",
                  file=sys.stderr, flush=True)

    matmul_gflops = {dtype: median([m["gflops"] for m in found]) for dtype, found in matmuls.items()}
    peak = PEAK_BF16_FLOPS.get(machine["device_kind"]) if machine["backend"] != "cpu" else None
    if machine["backend"] != "cpu" and peak is None:
        notes.append(f"no bf16 peak listed for {machine['device_kind']!r}: MFU left blank, see % matmul")
    if machine["backend"] != "cpu":
        notes.append("each framework runs on one device, the first; float32 matmuls use each one's default precision")
    if "dots" in remats and "peft" in frameworks:
        notes.append("remat dots: jaxtok only (PEFT has no policy that keeps the matmul outputs only)")
    rows = [summarize(key, r, matmul_gflops[key[1]], peak) for key, r in runs.items()]
    failed = sum(row["failed_runs"] for row in rows)
    if failed:
        notes.append(f"{failed} of {sum(len(row['runs']) for row in rows)} runs failed; results.json has their errors")
    count = machine["device_count"]
    report = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
        machine=dict(name=f"{cpu_model()}, {os.cpu_count()} cores" if machine["backend"] == "cpu"
                     else f"{count} x {machine['device_kind']}" if count > 1 else machine["device_kind"],
                     backend=machine["backend"], device_kind=machine["device_kind"], device_count=count,
                     cpu=cpu_model(), cpu_count=os.cpu_count()),
        versions=versions(),
        settings=dict(shapes={s: dataclasses.asdict(SHAPES[s]) for s in shapes}, frameworks=frameworks,
                      variants=variants, dtypes=dtypes, remats=remats, attention=args.attention,
                      loss_chunk=args.loss_chunk, loss_vocab_block=args.loss_vocab_block, repeats=args.repeats,
                      warmup=args.warmup, steps=args.steps,
                      lora=dict(rank=RANK, alpha=ALPHA, targets="all-linear"), token_ids=list(TOKEN_IDS), lr=LR),
        matmul={dtype: dict(gflops=matmul_gflops[dtype], size=found[0]["size"], runs=[m["gflops"] for m in found])
                for dtype, found in matmuls.items()},
        peak_flops=peak, notes=notes, results=rows, ratios=ratios(rows),
    )
    table = markdown(report)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(table)
    print(table)
    if failed:
        print(f"{failed} runs failed; see {out / 'results.json'}", file=sys.stderr)
        sys.exit(1)


def peft_device(backend: str) -> tuple[str, Optional[str]]:
    """Where PEFT runs, on the chip jax runs on: ("cpu" | "cuda", None), or (_, why PEFT is skipped)."""
    if backend == "cpu":
        return "cpu", None
    if backend not in ("gpu", "cuda"):
        return "cpu", f"PEFT skipped: jax runs on {backend}, where torch does not"
    code = "import torch; print(torch.cuda.is_available())"  # asked in a process of its own: this one loads no CUDA
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if not proc.stdout.strip().endswith("True"):
        return "cpu", "PEFT skipped: jax runs on a GPU but this torch has no CUDA"
    return "cuda", None


if __name__ == "__main__":
    run_main(main)
