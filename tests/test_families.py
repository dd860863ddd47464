"""The Llama family beyond Llama: Mistral, Qwen2/2.5 and Qwen3 (and Llama with biases) keep Llama's guarantees.

Tiny random checkpoints of each family, built here by transformers, tied and untied, with and without a sliding window
shorter than the sequences: logits equal transformers' with left padding and packing, five AdamW steps equal PEFT's,
the PEFT adapter and the merged checkpoint load in PEFT and transformers with the same loss, greedy decoding with the
KV cache equals transformers' `generate`, the parameters place on a mesh by the same rules (8 devices in a child
process), a short `scripts/train.py` run with eval, sample and exports goes through, and each family's config in
configs/ locates the assistant turns of its chat layout.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import runpy
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import AbstractMesh

import mesh_files
import tiny
from jaxtok.convert import load_config, load_pretrained
from jaxtok.data import encode
from jaxtok.errors import JaxtokError
from jaxtok.export import export_merged, export_peft, hf_config
from jaxtok.generate import generate, stream
from jaxtok.llama_config import FULL, SLIDING, LlamaConfig
from jaxtok.lora import DEFAULT_TARGETS, LoraConfig
from jaxtok.model import Llama, abstract_variables, logical_axes_of
from jaxtok.sharding import AXES, tree_shardings
from jaxtok.trainable import adapters_of
from test_peft_parity import check_five_steps

TOL = 1e-5
QKV = ("q_proj", "k_proj", "v_proj")
# id -> (make_checkpoint arguments, the LlamaConfig fields they must give)
VARIANTS = {
    "mistral": (dict(family="mistral", sliding_window=None), dict(biases=(), qk_norm=False, layer_windows=())),
    "mistral-tied-window4": (dict(family="mistral", tied=True, sliding_window=4),
                             dict(biases=(), qk_norm=False, layer_windows=(4, 4))),
    "qwen2": (dict(family="qwen2"), dict(biases=QKV, qk_norm=False, layer_windows=())),
    # max_window_layers=1: layer 0 full, layer 1 sliding, as transformers computes layer_types
    "qwen2-tied-window3": (dict(family="qwen2", tied=True, use_sliding_window=True, sliding_window=3,
                                max_window_layers=1), dict(biases=QKV, qk_norm=False, layer_windows=(0, 3))),
    "qwen3": (dict(family="qwen3"), dict(biases=(), qk_norm=True, layer_windows=())),
    # explicit layer_types, the other way round from max_window_layers; attention_bias puts biases on q, k, v, o
    "qwen3-tied-window5-bias": (dict(family="qwen3", tied=True, use_sliding_window=True, sliding_window=5,
                                     layer_types=[SLIDING, FULL], attention_bias=True),
                                dict(biases=QKV + ("o_proj",), qk_norm=True, layer_windows=(5, 0))),
    "llama-biases": (dict(family="llama", attention_bias=True, mlp_bias=True),
                     dict(biases=QKV + ("o_proj", "gate_proj", "up_proj", "down_proj"), qk_norm=False,
                          layer_windows=())),
}
WINDOWED = [v for v in VARIANTS if "window" in v]  # every layer sliding, layer 1 sliding, layer 0 sliding
TRAINED = [v for v in VARIANTS if not v.startswith("llama")]  # Llama itself is test_peft_parity's
T = 12  # longer than every window
TRAINS = pytest.mark.slow  # five steps in both frameworks


def _checkpoint(checkpoint, variant):
    return checkpoint(**VARIANTS[variant][0])


@pytest.fixture(scope="module")
def loaded(torch_checkpoint):
    """variant -> (directory, HF model, jaxtok model, params), loaded once for the module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            directory, hf = _checkpoint(torch_checkpoint, variant)
            cache[variant] = (directory, hf, *load_pretrained(str(directory)))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_json_gives_the_family_fields(torch_checkpoint, variant):
    directory, hf = _checkpoint(torch_checkpoint, variant)
    config = load_config(directory)
    expected = VARIANTS[variant][1]
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.architecture == type(hf).__name__
    assert config.tie_word_embeddings == VARIANTS[variant][0].get("tied", False)
    # what export writes reads back as the same network, and transformers reads it as the same config
    written = hf_config(config, "float32")
    assert LlamaConfig.from_hf(written) == config
    theirs = transformers.AutoConfig.for_model(**written)
    assert type(theirs) is type(hf.config)
    assert getattr(theirs, "layer_types", None) == getattr(hf.config, "layer_types", None)
    assert getattr(theirs, "sliding_window", None) == getattr(hf.config, "sliding_window", None)


def _batch():
    """Rows 0 and 1 left-padded (12 and 7 real tokens), row 2 two packed documents (7 and 5 tokens)."""
    tokens, mask, positions = tiny.left_padded([T, 7, T], T, seed=3)
    segments = mask.copy()
    segments[2, 7:] = 2
    positions[2] = list(range(7)) + list(range(5))
    return tokens, segments, positions


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(loaded, tiny_torch, variant):
    """Left padding and packing, fp32, 1e-5 relative; with a window shorter than the rows, the window matters."""
    _, hf, model, params = loaded(variant)
    tokens, segments, positions = _batch()
    ours = tiny.jax_logits(model, params, tokens, positions, segments)
    padded = tiny_torch.hf_logits(hf, tokens[:2], segments[:2], positions[:2])
    for b in range(2):
        real = segments[b] == 1
        assert tiny.rel_err(ours[b][real], padded[b][real]) <= TOL, f"row {b}"
    for doc in (1, 2):  # each packed document gives its own logits
        span = segments[2] == doc
        alone = tiny_torch.hf_logits(hf, tokens[2][span][None])[0]
        assert tiny.rel_err(ours[2][span], alone) <= TOL, f"document {doc}"
    if model.config.layer_windows:
        full = model.clone(config=dataclasses.replace(model.config, layer_types=(), sliding_window=None))
        unwindowed = tiny.jax_logits(full, params, tokens, positions, segments)
        assert tiny.rel_err(unwindowed[0], padded[0]) > 1e-3  # so the test above would see a wrong window


@pytest.mark.parametrize("variant", WINDOWED)
def test_decoding_with_a_window_matches_hf(loaded, tiny_torch, variant):
    """Prompts and continuations longer than the window: the KV cache decodes what transformers decodes."""
    _, hf, model, params = loaded(variant)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 320, size=n).tolist() for n in (7, 3)]
    ours = generate(model, {"params": params}, prompts, 10)
    for b, prompt in enumerate(prompts):
        assert ours[b] == tiny_torch.hf_greedy(hf, prompt, 10), f"row {b}"
    assert list(stream(model, {"params": params}, prompts[0], 10)) == ours[0]  # left-padded to a bucket of 64


@pytest.mark.parametrize("variant", ["mistral", "qwen2", "qwen3"])
def test_lora_targets_are_pefts(torch_checkpoint, variant):
    """PEFT's "all-linear" and its default targets for the family are jaxtok's, module for module."""
    peft = pytest.importorskip("peft")
    _, hf = _checkpoint(torch_checkpoint, variant)
    for targets, ours in (("all-linear", LoraConfig(targets="all-linear").targets), (None, DEFAULT_TARGETS)):
        model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=targets))
        wrapped = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
        assert wrapped == set(ours), targets


@pytest.fixture(scope="module")
def trained(loaded):
    """variant -> check_five_steps' (model, variables, PEFT model, batches), trained once for the module."""
    pytest.importorskip("peft")
    cache = {}

    def get(variant):
        if variant not in cache:
            directory, hf, _, _ = loaded(variant)
            cache[variant] = check_five_steps(directory, hf, VARIANTS[variant][0].get("tied", False))
        return cache[variant]

    return get


@TRAINS
@pytest.mark.parametrize("variant", TRAINED)
def test_five_steps_match_peft(trained, variant):
    trained(variant)  # check_five_steps asserts: losses, adapters and logits equal PEFT's


def _jax_loss(model, variables, batch) -> float:
    """jaxtok's fused training loss on a right-padded batch."""
    segments = jnp.asarray(batch["segments"])
    (total, count), _ = jax.jit(model.apply)(variables, jnp.asarray(batch["tokens"]), None, segments,
                                             loss_mask_BT=segments)
    return float(total / count)


def _torch_loss(tiny_torch, hf, batch) -> float:
    rows = [tokens[segments == 1].tolist() for tokens, segments in zip(batch["tokens"], batch["segments"])]
    return tiny_torch.eval_loss(hf, rows)  # right-padded again, as the batch is


@TRAINS
@pytest.mark.parametrize("variant", TRAINED)
def test_exports_load_with_the_same_loss(loaded, trained, tiny_torch, variant, tmp_path):
    import peft
    import torch

    directory, hf, _, _ = loaded(variant)
    model, variables, _, batches = trained(variant)
    adapters = adapters_of(variables)
    ours = _jax_loss(model, variables, batches[0])

    out = export_peft(tmp_path / "adapter", model, adapters, str(directory))
    assert json.loads((out / "adapter_config.json").read_text())["bias"] == "none"
    base = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert type(base) is type(hf)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    assert abs(_torch_loss(tiny_torch, peft_model, batches[0]) - ours) <= TOL * ours

    merged_dir = export_merged(tmp_path / "merged", model, variables["params"], adapters)
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(merged) is type(hf) and merged.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert getattr(merged.config, "layer_types", None) == getattr(hf.config, "layer_types", None)
    assert merged.config.sliding_window == hf.config.sliding_window
    assert abs(_torch_loss(tiny_torch, merged, batches[0]) - ours) <= TOL * ours
    # the frozen biases and norms are written back as they were
    state, base_state = merged.state_dict(), hf.state_dict()
    frozen = [n for n in base_state if n.endswith(".bias") or "norm" in n]
    assert frozen and all(torch.equal(state[n], base_state[n]) for n in frozen)
    assert set(state) == set(base_state)


def test_biases_and_norms_place_by_the_rules():
    """Biases split like their kernel's output side, q/k norm scales (head_dim) stay whole, on a (2, 2, 2) mesh."""
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, model_type="qwen3", qk_norm=True, biases=QKV + ("o_proj",),
                         sliding_window=4, layer_types=(SLIDING, FULL))
    model = Llama(config)
    shardings = tree_shardings(nn.unbox(abstract_variables(model)), logical_axes_of(model),
                               AbstractMesh((2, 2, 2), AXES))
    attn = shardings["params"]["layers"]["attn"]
    specs = {name: tuple(attn[name][leaf].spec) for name, leaf in
             (("q_proj", "bias"), ("k_proj", "bias"), ("o_proj", "bias"), ("q_norm", "scale"), ("k_norm", "scale"))}
    assert specs == {"q_proj": (None, "tensor", None), "k_proj": (None, "tensor", None), "o_proj": (None, "fsdp"),
                     "q_norm": (None, None), "k_norm": (None, None)}


SHARDED = """
import json, sys
import jax, numpy as np
import tiny
from jaxtok.convert import load_pretrained
from jaxtok.sharding import make_mesh
directory = sys.argv[1]
tokens, mask, positions = tiny.left_padded([12, 7, 12, 9], 12, seed=4)
model, params = load_pretrained(directory)
single = tiny.jax_logits(model, params, tokens, positions, mask)
model, sharded = load_pretrained(directory, mesh=make_mesh((2, 2, 2)))
specs = {"/".join(str(k.key) for k in path): list(leaf.sharding.spec)
         for path, leaf in jax.tree_util.tree_flatten_with_path(sharded)[0]}
logits = tiny.jax_logits(model, sharded, tokens, positions, mask)
print("RESULT " + json.dumps({"devices": jax.device_count(), "err": tiny.rel_err(logits, single), "specs": specs}))
"""


@pytest.mark.slow  # a child process of 8 devices
def test_sharded_forward_on_8_devices(checkpoint, tmp_path):
    """A Qwen3 with biases, q/k norms and a sliding layer, loaded straight into shards on a (2, 2, 2) mesh, computes
    the logits of one device."""
    directory = _checkpoint(checkpoint, "qwen3-tied-window5-bias")
    result = subprocess.run([sys.executable, "-c", SHARDED, str(directory)], capture_output=True, text=True,
                            env=mesh_files.env(8), cwd=mesh_files.ROOT, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    found = json.loads(lines[-1].split(" ", 1)[1])
    assert found["devices"] == 8 and found["err"] <= TOL
    assert found["specs"]["layers/attn/q_proj/bias"] == [None, "tensor", None]  # [L, N, H]


def test_unknown_architecture_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}))
    with pytest.raises(JaxtokError, match=r"does not support GemmaForCausalLM: it loads LlamaForCausalLM, "
                                          r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_pretrained(str(tmp_path))
    # a known model_type under another head is refused too
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForSequenceClassification"],
                                                      "model_type": "qwen2"}))
    with pytest.raises(JaxtokError, match="does not support Qwen2ForSequenceClassification"):
        load_pretrained(str(tmp_path))


def test_missing_bias_and_norm_tensors_are_named(copy_checkpoint):
    from safetensors.numpy import load_file, save_file

    directory = copy_checkpoint(**VARIANTS["qwen3-tied-window5-bias"][0])
    path = directory / "model.safetensors"
    state = load_file(path)
    for name in ("model.layers.1.self_attn.o_proj.bias", "model.layers.0.self_attn.k_norm.weight"):
        save_file({k: v for k, v in state.items() if k != name}, path, metadata={"format": "pt"})
        with pytest.raises(JaxtokError, match=r"checkpoint lacks tensors: " + name.replace(".", r"\.")):
            load_pretrained(str(directory))
    # a Qwen3 without attention_bias has no biases: the same tensors are then unexpected
    save_file(state, path, metadata={"format": "pt"})
    tiny.edit_config(directory, attention_bias=False)
    with pytest.raises(JaxtokError, match=r"tensors that a Qwen3ForCausalLM of this config\.json does not: "
                                          r"model\.layers\.0\.self_attn\.\w_proj\.bias"):
        load_pretrained(str(directory))


@pytest.mark.slow  # trains through the command's code
def test_train_script_eval_and_exports(tmp_path, capsys):
    """scripts/train.py on a tied Qwen2 with a sliding layer (LoRA, an added token, eval, sample, both exports), then
    scripts/eval.py: the adapter on the base and the merged checkpoint evaluate alike."""
    root = tiny.write_run_files(
        tmp_path, vocab=320, rows=16, eval_rows=4,  # spare rows: the transformers-5 Qwen2Tokenizer adds a token
        checkpoint=VARIANTS["qwen2-tied-window3"][0],
        **{"lora.rank": 2, "train.steps": 2, "train.batch_size": 4, "train.seq_len": 32, "train.log_every": 1,
           "train.tensorboard": False, "sample.prompt": "The cat", "sample.max_new_tokens": 4})
    out = tmp_path / "run"
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    code, stdout, stderr = tiny.run_script(scripts / "train.py", [f"--config={root / 'config.py'}",
                                                                  f"--config.output_dir={out}"], capsys)
    assert code == 0, stderr[-3000:]
    assert "sample: 'The cat' ->" in stdout + stderr
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["architectures"] == ["Qwen2ForCausalLM"] and merged["layer_types"] == [FULL, SLIDING]
    losses = []
    for model_dir, extra in ((root / "model", [f"--adapter={out / 'adapter'}"]), (out / "merged", [])):
        code, stdout, stderr = tiny.run_script(scripts / "eval.py", [f"--model={model_dir}",
                                                                     f"--data={root / 'eval.jsonl'}", "--seq-len=32",
                                                                     *extra], capsys)
        assert code == 0, stderr[-3000:]
        losses.append(json.loads(stdout.strip().splitlines()[-1]))
    assert losses[0]["tokens"] == losses[1]["tokens"]
    assert abs(losses[0]["eval_loss"] - losses[1]["eval_loss"]) <= TOL * losses[1]["eval_loss"]


@pytest.mark.parametrize("name", ["mistral", "qwen25", "qwen3"])
def test_family_configs(name, tmp_path):
    """configs/<family>.py sets only keys that exist, and its chat template, on a tokenizer that has its chat tokens,
    makes exactly each assistant reply and its end of turn the targets, and its chat tokens single tokens."""
    config = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"))["get_config"]()
    tokenizer = tiny.make_tokenizer(tmp_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [*config.tokens.train, "<s>", "</s>"]})
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in config.tokens.train)
    messages = [{"role": "user", "content": "Call me Ishmael."}, {"role": "assistant", "content": "Hello Ishmael."},
                {"role": "user", "content": "Time flies."}, {"role": "assistant", "content": "Like an arrow."}]
    ids, mask = encode({"messages": messages}, tokenizer, "messages", config.data.chat_template)
    targets = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    stop = config.sample.stop
    assert targets.replace(" ", "").replace("\n", "") == f"HelloIshmael.{stop}Likeanarrow.{stop}"
