"""Step time of LoRA alone vs LoRA + trainable token rows, in jaxtok and in PEFT, side by side in one process.

    python scripts/benchmark.py [--vocab 128256 --hidden 256 --layers 2 --batch 4 --seq-len 128 --tokens 4]

Both frameworks load the same random Llama checkpoint (a Llama-3-sized vocabulary on a small body, so the embedding
dominates as it does in practice) and train the same targets with AdamW. Timings are medians over interleaved
repeats, so load on a shared machine hits every variant alike; the ratios are what to read. Needs torch and peft.
"""

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def build_checkpoint(args, directory: str) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def jaxtok_steps(args, directory: str, batch: np.ndarray):
    from jaxtok import trainable
    from jaxtok.convert import load_pretrained
    from jaxtok.lora import LoraConfig
    from jaxtok.optimizer import OptimConfig, make_optimizer, schedule
    from jaxtok.step import init_state, make_train_step
    from jaxtok.tokens import TokenRows

    base, params = load_pretrained(directory)
    ids = tuple(range(100, 100 + args.tokens))
    ones = jnp.ones((1,) + batch.shape, jnp.int32)
    micro = dict(tokens=jnp.asarray(batch)[None], positions=jnp.broadcast_to(jnp.arange(batch.shape[1]), ones.shape),
                 segment_ids=ones, loss_mask=ones)
    steps = {}
    for name, rows in (("lora", TokenRows()), ("lora+tokens", TokenRows(ids))):
        model = base.clone(lora=LoraConfig(rank=16, alpha=32, targets="all-linear"), token_rows=rows)
        adapters = trainable.init_adapters(model, params, jax.random.key(0))
        train, frozen = trainable.split({"params": params, **adapters})
        config = OptimConfig(lr=1e-4, schedule="constant")
        optimizer = make_optimizer(config, trainable.labels(train))
        step = make_train_step(model, optimizer, schedule(config, config.lr))
        state = [init_state(train, optimizer, 0)]
        memory = step.lower(state[0], frozen, micro).compile().memory_analysis()

        def run(step=step, state=state, frozen=frozen):
            state[0], metrics = step(state[0], frozen, micro)
            jax.block_until_ready(metrics["loss"])

        run()  # compile
        steps[name] = (run, memory.temp_size_in_bytes)
    return steps


def peft_steps(args, directory: str, batch: np.ndarray):
    import peft
    import torch
    import transformers

    tokens = torch.tensor(batch, dtype=torch.long)
    steps = {}
    for name, token_ids in (("lora", None), ("lora+tokens", list(range(100, 100 + args.tokens)))):
        model = transformers.LlamaForCausalLM.from_pretrained(directory)
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", trainable_token_indices=token_ids)
        model = peft.get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run(model=model, optimizer=optimizer):
            loss = model(input_ids=tokens, labels=tokens).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        run()
        steps[name] = (run, None)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4, help="trainable token rows")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timings per variant")
    args = parser.parse_args()

    batch = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq_len)).astype(np.int32)
    batch[:, ::7] = 100  # the trained tokens occur in the data
    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(args, directory)
        variants = {f"jaxtok {k}": v for k, v in jaxtok_steps(args, directory, batch).items()}
        variants.update({f"peft {k}": v for k, v in peft_steps(args, directory, batch).items()})
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (run, _) in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, batch {args.batch} x {args.seq_len}, "
          f"{args.tokens} token rows, {jax.devices()[0].device_kind}")
    for name, seconds in median.items():
        memory = variants[name][1]
        extra = f", XLA temp {memory / 2**20:.1f} MiB" if memory is not None else ""
        print(f"  {name:20s} {1000 * seconds:8.1f} ms/step{extra}")
    for framework in ("jaxtok", "peft"):
        ratio = median[f"{framework} lora+tokens"] / median[f"{framework} lora"]
        print(f"{framework}: LoRA + token rows / LoRA alone = {ratio:.3f}")
    print(f"peft / jaxtok, LoRA + token rows: {median['peft lora+tokens'] / median['jaxtok lora+tokens']:.2f}")


if __name__ == "__main__":
    main()
