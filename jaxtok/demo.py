"""The demo base model: a tiny Llama and tokenizer pretrained from text shipped in the repository, built once, cached.

The demo fine-tune (`configs/demo.py`) must run on a fresh clone, offline, on a laptop CPU. No Hub model fits, so
`ensure_demo_base` makes one: it trains a byte-level BPE tokenizer (1,280 tokens) and pretrains a Llama-3.2-shaped
model (2 layers, hidden 128, tied embeddings) on `demo_data/pretrain.txt` for a minute or two, then saves an ordinary
Hugging Face checkpoint that jaxtok and transformers both load. Configs name it by `DEMO_BASE`.

The text is mostly questions followed by the expression they ask for ("Add 16 and 48." then "16 + 48 = 64."), so
the base learns to copy a question's numbers and name its operation; the fine-tune then only has to map that skill
onto a calculator call. Copying appears abruptly, at about half of DEFAULT_STEPS; the rest is margin.

The base never sees the chat-template tokens or the calculator tokens of `DEMO_TOKENS`; the fine-tune adds them and
trains their rows, which is what jaxtok is for. `DEMO_CHAT_TEMPLATE` renders the chat data with them.

Caching: the checkpoint lives in `<cache>/demo-base-<key>`, where the key hashes `pretrain.txt`, the number of steps
and `BUILDER_VERSION`, so editing the data or the recipe builds a new one. A build happens in a hidden directory
beside the target and is renamed into place when complete, so an interrupted build leaves no half checkpoint, and a
process that loses a race with another building the same key keeps the winner's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxtok.errors import JaxtokError
from jaxtok.llama_config import LlamaConfig
from jaxtok.loss import next_token_loss
from jaxtok.model import Llama, abstract_params

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEMO_BASE = "jaxtok:demo-base"  # the model.path value that means "the demo base model"

# New tokens the fine-tune adds: Llama 3's chat-template tokens and a calculator call.
DEMO_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|calc|>", "<|/calc|>")
# Where each new token's row starts (`tokens.descriptions`: the mean of the text's rows). The base already writes a
# question's expression on the line after it ("...?\n29 + 28 = 57"), so a call starts as that line break and its end
# as the " =" after the expression; a turn ends as a text does, and a header reads like "\nuser:". Rows that start
# where the base already does their job leave the fine-tune only the mapping to learn.
DEMO_TOKEN_DESCRIPTIONS = ("\n", ":", "<|end_of_text|>", "\n", " =")

# Llama 3's template. `{% generation %}` marks assistant text for transformers' `return_assistant_tokens_mask`.
DEMO_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

BUILDER_VERSION = "2"  # bump when the recipe below changes, so cached checkpoints are rebuilt
DEFAULT_STEPS = 400  # about a minute on two idle CPU cores, two under load
DATA_DIR = Path(__file__).resolve().parent / "demo_data"
MARKER = "demo_base.json"  # written last into a build; holds the recipe and the losses

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB_SIZE = 1280
SEQ_LEN = 128
BATCH_SIZE = 16
PEAK_LR, WARMUP_STEPS = 5e-3, 20
SEED = 0


def demo_data_path(name: str) -> Path:
    """A file shipped in jaxtok/demo_data: pretrain.txt, chat_train.jsonl, chat_eval.jsonl or README.md."""
    path = DATA_DIR / name
    if not path.is_file():
        raise JaxtokError(f"demo data file {path} is missing; reinstall jaxtok from the repository "
                          "(or regenerate it with scripts/make_demo_data.py)")
    return path


def default_cache_dir() -> Path:
    """$JAXTOK_CACHE, else ~/.cache/jaxtok."""
    return Path(os.environ.get("JAXTOK_CACHE") or Path.home() / ".cache" / "jaxtok").expanduser()


def cache_key(pretrain: bytes, steps: int, version: str = BUILDER_VERSION) -> str:
    """Short hash of everything the checkpoint depends on."""
    digest = hashlib.sha256(f"{version}\0{steps}\0".encode())
    digest.update(pretrain)
    return digest.hexdigest()[:12]


def demo_base_dir(cache_dir: str | os.PathLike | None = None, steps: int = DEFAULT_STEPS) -> Path:
    """Where the demo base of `steps` pretraining steps is (or will be) cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(demo_data_path("pretrain.txt").read_bytes(), steps, BUILDER_VERSION)
    return root / f"demo-base-{key}"


def ensure_demo_base(cache_dir: str | os.PathLike | None = None, progress: bool = True, *,
                     steps: int | None = None) -> Path:
    """The directory of the demo base checkpoint, building it first if it is not cached yet.

    `steps` overrides the number of pretraining steps (tests use a few); it is part of the cache key.
    """
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise JaxtokError(f"the demo base needs at least one pretraining step (got steps={steps})")
    target = demo_base_dir(cache_dir, steps)
    if (target / MARKER).is_file():
        return target
    if target.exists():
        raise JaxtokError(f"{target} exists but is not a complete demo base checkpoint; delete it and run again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    except OSError as e:
        raise JaxtokError(f"cannot write the demo base cache in {target.parent} ({e.strerror}); "
                          "set JAXTOK_CACHE to a writable directory") from None
    if progress:
        print(f"building the demo base model once (a minute or two), cached in {target}", file=sys.stderr)
    try:
        built = build_demo_base(work / "model", steps, progress)
        try:
            os.rename(built, target)
        except OSError:
            if not (target / MARKER).is_file():
                raise
            # Another process built the same key first; its checkpoint comes from the same recipe, so use it.
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_model_path(path: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> str:
    """`path` unchanged, except `DEMO_BASE`, which becomes the (built if needed) demo base directory."""
    return str(ensure_demo_base(cache_dir, progress)) if path == DEMO_BASE else path


def build_demo_base(out_dir: str | os.PathLike, steps: int = DEFAULT_STEPS, progress: bool = True) -> Path:
    """Trains the tokenizer, pretrains the model for `steps` steps and exports both to `out_dir` (must not exist)."""
    from jaxtok.export import export_merged  # imports the merge code only when a build happens

    start = time.time()
    text = demo_data_path("pretrain.txt").read_text(encoding="utf-8")
    documents = [d for d in text.split("\n\n") if d.strip()]
    tokenizer = train_tokenizer(documents)
    rows = pack(tokenizer, documents, SEQ_LEN)
    model = Llama(demo_config(len(tokenizer)))
    params = init_params(model, SEED)
    params, losses = pretrain(model, params, rows, steps, progress)
    export_merged(out_dir, model, params, {}, tokenizer=tokenizer, dtype="float32")
    info = {
        "builder_version": BUILDER_VERSION,
        "steps": steps,
        "tokens_per_step": BATCH_SIZE * SEQ_LEN,
        "pretrain_tokens": int(rows.size),
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-10:])),  # mean of the last steps, less noisy than one batch
        "seconds": round(time.time() - start, 1),
    }
    (Path(out_dir) / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    if progress:
        print(f"demo base: {steps} steps in {info['seconds']} s, loss {info['loss_first']:.3f} -> "
              f"{info['loss_last']:.3f}", file=sys.stderr)
    return Path(out_dir)


def train_tokenizer(documents: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB_SIZE tokens that prepends BOS, as a transformers fast tokenizer (no chat template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Numbers in pieces of up to three digits, as Llama 3 splits them: the BPE then learns nearly every number the
    # demo uses as one token, so a calculator call copies an operand as one token rather than digit by digit, which
    # a model this small learns in far fewer steps.
    digits = pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=512)


def demo_config(vocab_size: int) -> LlamaConfig:
    """A Llama 3.2 shape (tied embeddings) at toy size. Four key-value heads, one per query head: sharing them, as
    GQA does, made learning to copy numbers slower and less reliable across data seeds at this size."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
    )


def init_params(model: Llama, seed: int) -> dict:
    """Random weights as `Llama`'s initializers draw them (normal(0.02), norm scales one), in the tree of
    `model.init`. Drawn with numpy from the abstract tree: `model.init` itself would compile the network once just
    to draw random numbers, seconds of a build that should take a minute or two."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if getattr(path[-1], "key", None) == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(model)))


def pack(tokenizer: PreTrainedTokenizerFast, documents: list[str], seq_len: int) -> np.ndarray:
    """[R, seq_len] int32: every document as BOS ... EOS, concatenated and cut into rows (the tail is dropped)."""
    ids = tokenizer(documents)["input_ids"]
    stream = np.fromiter((t for doc in ids for t in doc + [tokenizer.eos_token_id]), np.int32)
    rows = len(stream) // seq_len
    if rows < BATCH_SIZE:
        raise JaxtokError(f"pretrain.txt gives {len(stream)} tokens, too few for one batch of "
                          f"{BATCH_SIZE} x {seq_len}; regenerate it with scripts/make_demo_data.py")
    return stream[: rows * seq_len].reshape(rows, seq_len)


def pretrain(model: Llama, params: dict, rows: np.ndarray, steps: int,
             progress: bool = True) -> tuple[dict, list[float]]:
    """Full-parameter AdamW pretraining on shuffled rows; returns (params, loss of every step)."""
    warmup = min(WARMUP_STEPS, steps // 2)  # short (test) builds still get some decay after warmup
    lr = optax.warmup_cosine_decay_schedule(0.0, PEAK_LR, warmup, steps, end_value=PEAK_LR / 10)
    # Light decay on every tensor: over a few hundred steps it barely moves the norm scales it also touches.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, tokens_BT):
        def loss_fn(p):
            logits_BTV, _ = model.apply({"params": p}, tokens_BT)
            total, count = next_token_loss(logits_BTV, tokens_BT, jnp.ones_like(tokens_BT))
            return total / count

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(SEED)
    order = np.empty(0, np.int64)
    losses = []
    bar = tqdm(range(steps), desc="pretraining demo base", disable=not progress, leave=False)
    for i in bar:
        if len(order) < BATCH_SIZE:  # a new epoch: reshuffle the rows
            order = np.concatenate([order, rng.permutation(len(rows))])
        batch, order = rows[order[:BATCH_SIZE]], order[BATCH_SIZE:]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(batch))
        losses.append(float(loss))
        if i % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses
