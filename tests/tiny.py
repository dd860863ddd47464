"""Tiny Hugging Face checkpoints and tokenizers for tests, built on the fly (no Hub access, no torch).

Import from tests as `import tiny` (pytest puts the tests directory on sys.path). The torch side, transformers' model
of a checkpoint and its outputs, is `tiny_torch`; only tests that compare with PyTorch import it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import transformers
from safetensors.numpy import load_file, save_file

from jaxtok.export import write_safetensors

HIDDEN, HEAD_DIM, INTERMEDIATE = 64, 16, 128

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "The rain in Spain stays mainly in the plain.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold.",
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael.",
    "In the beginning the universe was created.",
    "The cat sat on the mat and looked at the hat.",
    "We shall fight on the beaches, we shall fight on the landing grounds.",
    "Ask not what your country can do for you.",
    "I think, therefore I am.",
    "The only thing we have to fear is fear itself.",
    "Houston, we have a problem.",
    "Elementary, my dear Watson.",
    "May the force be with you.",
    "Knowledge is power, and power is responsibility.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Colorless green ideas sleep furiously.",
    "Please pass the salt and the pepper.",
    "The train to Boston leaves at 7:45 in the morning.",
    "My phone number is 555-0123, call me after 6 pm.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The mitochondria is the powerhouse of the cell.",
    "Python lists are mutable, but tuples are not.",
    "def add(a, b): return a + b",
    "for i in range(10): print(i * i)",
    "Once upon a time, there lived a king who had three daughters.",
    "The museum opens on Tuesday and closes on Sunday.",
    "He ordered two coffees, one tea and a slice of cake.",
    "Why did the chicken cross the road? To get to the other side!",
    "Seven seas, six continents, and one small blue planet.",
    "Yesterday it snowed; today the sun is shining again.",
    "Translate 'hello' into French: bonjour.",
    "Question: what is 12 plus 30? Answer: 42.",
    "The committee will meet again next week to vote.",
    "Birds of a feather flock together.",
]


def make_checkpoint(
    dir,
    *,
    tied: bool = False,
    kv_heads: int = 2,
    heads: int = 4,
    rope: dict | None = None,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    vocab: int = 320,
    layers: int = 2,
    seed: int = 0,
    spelling: str = "v5",
    max_position_embeddings: int = 64,
    family: str = "llama",
    **family_config,
) -> Path:
    """Saves a random `LlamaForCausalLM` checkpoint to `dir`, as `save_pretrained` writes one, and returns `dir`.

    `family` (a key of FAMILIES: llama, mistral, qwen2, qwen3) saves that family's model instead, and
    `family_config` are further keys of its config, e.g. `sliding_window=4` or `attention_bias=True`.

    `rope` holds the HF RoPE parameters besides theta, e.g. `{"rope_type": "linear", "factor": 2.0}`.
    `dtype`: of the saved weights, "float32", "bfloat16" or "float16" (drawn in float32, rounded once).
    `max_shard_bytes`: shards of at most that size with their index, instead of one model.safetensors.
    `spelling`: "v5" as transformers 5 writes config.json; "v4" with top-level `rope_theta`, `rope_scaling`
    (`rope_type` key) and `torch_dtype`; "v4-type" like "v4" but with the older `type` key in `rope_scaling`.

    The weights are drawn in numpy from `seed`: matrices as transformers initialises them (normal, std
    `initializer_range` = 0.1), and norm weights and biases randomised too (HF initialises them to ones and zeros) so
    swapped norms or biases cannot go unnoticed.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
    config_class, architecture = FAMILIES[family]
    config = config_class(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_parameters=rope_parameters,
        bos_token_id=0,
        eos_token_id=1,
        architectures=[architecture],
        **family_config,
    )
    config.dtype = dtype
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in tensor_shapes(config).items():
        noise = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * noise
        elif name.endswith(".bias"):
            value = 0.2 * noise
        else:
            value = np.float32(config.initializer_range) * noise
        tensors[name] = value.astype(DTYPES[dtype])
    config.save_pretrained(dir)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(dir)
    write_safetensors(dir, tensors, max_shard_bytes or sum(v.nbytes for v in tensors.values()))
    if spelling != "v5":
        rewrite_config_v4(dir, use_type_key=spelling == "v4-type")
    return dir


# model_type -> (transformers config class, architecture); the configs need no torch
FAMILIES = {
    "llama": (transformers.LlamaConfig, "LlamaForCausalLM"),
    "mistral": (transformers.MistralConfig, "MistralForCausalLM"),
    "qwen2": (transformers.Qwen2Config, "Qwen2ForCausalLM"),
    "qwen3": (transformers.Qwen3Config, "Qwen3ForCausalLM"),
}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, of every tensor a checkpoint of `config` (a config of FAMILIES) holds.

    Written from transformers' modelling code, not from jaxtok's conversion table, which the tests check;
    `tiny_torch.load_model` checks that transformers finds exactly these tensors."""
    D, F, H = config.hidden_size, config.intermediate_size, config.head_dim
    N, K = config.num_attention_heads, config.num_key_value_heads
    linear = {"self_attn.q_proj": (N * H, D), "self_attn.k_proj": (K * H, D), "self_attn.v_proj": (K * H, D),
              "self_attn.o_proj": (D, N * H), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
    biased = set()
    if config.model_type == "qwen2":  # always q, k and v
        biased |= {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    if getattr(config, "attention_bias", False):
        biased |= {name for name in linear if name.startswith("self_attn.")}
    if getattr(config, "mlp_bias", False):
        biased |= {name for name in linear if name.startswith("mlp.")}
    shapes = {"model.embed_tokens.weight": (config.vocab_size, D)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for name, shape in linear.items():
            shapes[f"{layer}{name}.weight"] = shape
            if name in biased:
                shapes[f"{layer}{name}.bias"] = shape[:1]
        if config.model_type == "qwen3":
            shapes[f"{layer}self_attn.q_norm.weight"] = shapes[f"{layer}self_attn.k_norm.weight"] = (H,)
        shapes[f"{layer}input_layernorm.weight"] = shapes[f"{layer}post_attention_layernorm.weight"] = (D,)
    shapes["model.norm.weight"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, D)
    return shapes


def rewrite_config_v4(dir, use_type_key: bool = False) -> dict:
    """Rewrites `dir/config.json` from the transformers 5 spelling into the transformers 4 / Meta one."""
    path = Path(dir) / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters", None) or {})
    config["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", "default")
    rope.pop("type", None)
    if rope_type == "default":
        config["rope_scaling"] = None
    else:
        config["rope_scaling"] = {("type" if use_type_key else "rope_type"): rope_type, **rope}
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.44.0"
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def edit_config(dir, **changes) -> dict:
    """Sets keys of `dir/config.json` (a value of `...` deletes the key); returns the new dict."""
    path = Path(dir) / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))
    return config


def make_tokenizer(dir) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE (vocab <= 300) on CORPUS, with BOS prepended to every encoding; saves it to `dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, padding_side="left"
    )
    Path(dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(dir)
    return fast


def rel_err(a, b) -> float:
    """max|a - b| / max|b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def left_padded(lengths: list[int], T: int, vocab: int = 320, seed: int = 0):
    """A left-padded batch: tokens [B, T] (int32), segment ids (1 real, 0 padding) and HF-style positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(len(lengths), T)).astype(np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def jax_logits(model, params, tokens, positions=None, segment_ids=None, jit=True) -> np.ndarray:
    """float32 logits of a jaxtok model (segment ids: 1 real, 0 padding)."""
    import jax

    apply = jax.jit(model.apply) if jit else model.apply
    logits, _ = apply({"params": params}, tokens, positions, segment_ids)
    return np.asarray(logits.astype(np.float32))


NEW_TOKEN = "<|x|>"


def write_run_files(root, *, vocab: int, rows: int, eval_rows: int = 0, checkpoint: dict | None = None,
                    **config) -> Path:
    """A tiny untied checkpoint with a tokenizer (root/model), text data that uses the new token NEW_TOKEN
    (root/train.jsonl, and root/eval.jsonl with `eval_rows`), and root/config.py: default_config() with the model, the
    data, that token and `config` ({"train.steps": 4, ...}, values written with repr) set. `checkpoint`: further
    arguments of `make_checkpoint` (another family, a tied head, ...)."""
    root = Path(root)
    make_checkpoint(root / "model", **{"tied": False, "vocab": vocab, **(checkpoint or {})})
    make_tokenizer(root / "model")
    for name, count in (("train.jsonl", rows), ("eval.jsonl", eval_rows)):
        with open(root / name, "w") as f:
            for i in range(count):
                f.write(json.dumps({"text": f"{CORPUS[i % len(CORPUS)]} {NEW_TOKEN} {i % 7}"}) + "\n")
    write_config(root, **{"data.eval": str(root / "eval.jsonl") if eval_rows else "", **config})
    return root


def write_config(root, **config) -> Path:
    """root/config.py: default_config() with root/model, root/train.jsonl, tokens.add=(NEW_TOKEN,),
    tokens.train=("<|end_of_text|>",) and `config` set."""
    root = Path(root)
    settings = {"model.path": str(root / "model"), "model.dtype": "float32", "data.train": str(root / "train.jsonl"),
                "tokens.add": (NEW_TOKEN,), "tokens.train": ("<|end_of_text|>",), **config}
    lines = [f"    c.{key} = {value!r}\n" for key, value in settings.items()]
    (root / "config.py").write_text("from jaxtok.run_config import default_config\n\n\ndef get_config():\n"
                                    "    c = default_config()\n" + "".join(lines) + "    return c\n")
    return root / "config.py"


def damage_rows(dir, *, embed_zero=(), embed_scale=(), head_zero=(), head_scale=(), factor: float = 1e-4) -> None:
    """Makes rows of `dir`'s checkpoint look untrained, as Llama 3 base ships some: embedding (and head) rows set to
    zero, or scaled by `factor` (in float32, rounded once to the checkpoint's dtype)."""
    path = Path(dir) / "model.safetensors"
    tensors = load_file(path)
    for name, zero, scale in (("model.embed_tokens.weight", embed_zero, embed_scale),
                              ("lm_head.weight", head_zero, head_scale)):
        if zero or scale:
            rows = tensors[name].copy()
            rows[list(zero)] = 0
            rows[list(scale)] = (rows[list(scale)].astype(np.float32) * np.float32(factor)).astype(rows.dtype)
            tensors[name] = rows
    save_file(tensors, path, metadata={"format": "pt"})


@dataclasses.dataclass
class UntrainedRun:
    """A finished short run of scripts/train.py with tokens.train_untrained=True (see `untrained_run`)."""

    root: Path  # model/ (the damaged base), train.jsonl, config.py
    out: Path  # the run's output_dir
    log: str  # its stdout and stderr
    damaged: dict  # {"embed_zero": ids, ...}: the rows made untrained
    unused: int  # a damaged id the data never use
    added: int  # the id of NEW_TOKEN
    trained: tuple  # tokens.train: an ordinary id and a damaged one


def untrained_run(root) -> UntrainedRun:
    """Trains 4 steps, untied head, on a checkpoint with embedding rows zeroed and scaled down and head rows scaled
    down and zeroed, all of tokens every training row uses, and one zeroed row of a token no row uses; with
    tokens.add (NEW_TOKEN) and tokens.train (an ordinary token and one of the damaged ones)."""
    import subprocess
    import sys

    root = Path(root)
    write_run_files(root, vocab=300, rows=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "model")
    text = CORPUS[10]  # "The cat sat on the mat and looked at the hat."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    middle = list(dict.fromkeys(ids[1:-2]))  # every one has a next token to predict in every row
    rows = [f"{text} {NEW_TOKEN} {CORPUS[i % len(CORPUS)][:12]}" for i in range(16)]
    used = {t for row in rows for t in tokenizer(row)["input_ids"]}
    unused = next(i for i in range(250, 2, -1) if i not in used)
    damaged = {"embed_zero": middle[:1], "embed_scale": middle[1:2], "head_scale": middle[2:3],
               "head_zero": middle[3:4]}
    damage_rows(root / "model", embed_zero=damaged["embed_zero"] + [unused], embed_scale=damaged["embed_scale"],
                head_scale=damaged["head_scale"], head_zero=damaged["head_zero"])
    (root / "train.jsonl").write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    trained = (middle[4], damaged["embed_scale"][0])
    write_config(root, **{
        "tokens.train": trained, "tokens.train_untrained": True, "lora.rank": 2, "optim.lr": 1e-2,
        "optim.token_lr": 5e-2, "train.steps": 4, "train.batch_size": 4, "train.seq_len": 32, "train.save_every": 2,
        "train.log_every": 2, "sample.max_new_tokens": 0})
    out = root / "run"
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "train.py"),
                             f"--config={root / 'config.py'}", f"--config.output_dir={out}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return UntrainedRun(root, out, result.stdout + result.stderr, damaged, unused, 300, trained)


def run_script(script, argv, capsys, stdin: str = "") -> tuple[int, str, str]:
    """Runs a script of scripts/ in this process, on the command's own code path but without starting Python and
    importing jax again: (exit code, stdout, stderr), `stdin` as its standard input."""
    import io
    import runpy
    import sys

    old_argv, old_stdin = sys.argv, sys.stdin
    sys.argv, sys.stdin = [str(script), *map(str, argv)], io.StringIO(stdin)
    try:
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
    captured = capsys.readouterr()
    return code, captured.out, captured.err
