"""PEFT adapters into jaxtok: an adapter trained in PyTorch gives the same logits here, can train on, and what jaxtok
cannot compute is refused by name."""

from __future__ import annotations

import copy
import json
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny
from jaxtok import trainable
from jaxtok.convert import load_pretrained
from jaxtok.errors import JaxtokError
from jaxtok.export import export_peft
from jaxtok.llama_config import LlamaConfig
from jaxtok.lora import LoraConfig
from jaxtok.peft_format import lora_shapes, read_adapter_config
from jaxtok.peft_import import load_peft_adapter, resize_vocab
from jaxtok.tokens import TokenRows

BASE_VOCAB, ADDED = 300, (300, 301)
CASES = {
    "tied": dict(tied=True, lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "tied-tokens": dict(tied=True, lora=dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                             trainable_token_indices=[5, 17, 42])),
    "untied": dict(tied=False, lora=dict(r=2, lora_alpha=16, target_modules=["self_attn.o_proj", "mlp.down_proj"])),
    # tokens added to the vocabulary: the base is resized, and the new tokens' head rows train too
    "untied-added": dict(tied=False, resize=True, lora=dict(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
        trainable_token_indices={"embed_tokens": [5, *ADDED], "lm_head": list(ADDED)})),
}


@pytest.fixture(scope="module")
def bases(checkpoint):
    """`bases(tied)` -> (checkpoint directory, jaxtok base, params), loaded once per module."""
    cache = {}

    def get(tied):
        if tied not in cache:
            directory = checkpoint(tied=tied, vocab=BASE_VOCAB)
            cache[tied] = (directory, *load_pretrained(str(directory)))
        return cache[tied]

    return get


@pytest.fixture(scope="module")
def hf_bases(torch_checkpoint):
    """`hf_bases(tied)` -> transformers' torch model of the same checkpoint as `bases(tied)`."""
    return lambda tied: torch_checkpoint(tied=tied, vocab=BASE_VOCAB)[1]


def _train_in_torch(hf_model, lora_kwargs, vocab, steps=3):
    """A PEFT model trained a few AdamW steps on random batches that use the trained token ids."""
    import peft
    import torch

    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rs = np.random.RandomState(0)
    model.train()
    for _ in range(steps):
        tokens = rs.randint(0, vocab, (2, 8))
        tokens[:, 1::3] = rs.choice([5, 17, 42, vocab - 1], tokens[:, 1::3].shape)
        tokens = torch.tensor(tokens)
        logits = model(input_ids=tokens).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _adapter_shapes(model, params):
    """Shapes and dtypes of the adapters `init_adapters` would create for `model`, without running it."""

    def init(params):
        return model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), rngs={"params": jax.random.key(0)},
                           mutable=["lora", "tokens"])[1]

    return jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(dict(jax.eval_shape(init, params))))


@pytest.mark.slow  # trains in PyTorch
@pytest.mark.parametrize("case", CASES)
def test_adapter_trained_in_pytorch_gives_the_same_logits(bases, hf_bases, tiny_torch, tmp_path, case):
    pytest.importorskip("peft")
    spec = CASES[case]
    _, base, params = bases(spec["tied"])
    hf_model = copy.deepcopy(hf_bases(spec["tied"]))
    vocab = BASE_VOCAB
    if spec.get("resize"):
        vocab += len(ADDED)
        hf_model.resize_token_embeddings(vocab)
    peft_model = _train_in_torch(hf_model, spec["lora"], vocab)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)

    if spec.get("resize"):
        with pytest.raises(JaxtokError, match="resize_vocab"):
            load_peft_adapter(tmp_path / "adapter", base, params)
        base, params = resize_vocab(base, params, vocab)
    model, adapters = load_peft_adapter(tmp_path / "adapter", base, params)
    lora = spec["lora"]
    assert (model.lora.rank, model.lora.alpha, model.lora.rslora, model.lora.dropout) == (
        lora["r"], lora["lora_alpha"], lora.get("use_rslora", False), lora.get("lora_dropout", 0.0))
    # the trainable tree, exactly as jaxtok would have created it for this model, so training can go on from it
    assert jax.tree.map(lambda x: (x.shape, x.dtype), adapters) == _adapter_shapes(model, params)
    train, _ = trainable.split({"params": params, **adapters})
    assert jax.tree.structure(train) == jax.tree.structure(adapters)

    tokens = np.array([[0, 5, 9, 17, 120, 42, 3, 77, vocab - 1, 8], [0, vocab - 2, 250, 42, 5, 1, 60, 17, 8, 2]])

    logits, _ = jax.jit(model.apply)({"params": params, **adapters}, tokens)
    assert tiny.rel_err(logits, tiny_torch.hf_logits(peft_model, tokens)) < 1e-5

    if case == "untied-added":
        # PEFT's default for a resized base also saves the full matrices: refused, with the fix
        peft_model.save_pretrained(tmp_path / "full", save_embedding_layers=True)
        with pytest.raises(JaxtokError, match="save_embedding_layers=False"):
            load_peft_adapter(tmp_path / "full", base, params)


def test_export_then_import_round_trips(bases, tmp_path):
    directory, base, params = bases(False)
    model = base.clone(lora=LoraConfig(rank=3, alpha=6.5, dropout=0.05, targets=("k_proj", "gate_proj"), rslora=True),
                       token_rows=TokenRows((7, 3, 11), (11, 2)))
    rs = np.random.RandomState(0)
    adapters = {"lora": {"layers": {}}, "tokens": {"embed": rs.randn(3, 64).astype(np.float32),
                                                   "head": rs.randn(2, 64).astype(np.float32)}}
    for module, shapes in lora_shapes(model.config, model.lora).items():
        block = "attn" if module == "k_proj" else "mlp"
        adapters["lora"]["layers"].setdefault(block, {})[module] = {
            m: rs.randn(*shape).astype(np.float32) for m, shape in shapes.items()}
    export_peft(tmp_path / "adapter", model, adapters, str(directory))
    loaded, back = load_peft_adapter(tmp_path / "adapter", base, params)
    assert loaded.lora == model.lora and loaded.token_rows == model.token_rows
    chex.assert_trees_all_equal(back, adapters)


@pytest.fixture(scope="module")
def peft_adapter(bases, hf_bases, tmp_path_factory):
    """An untrained PEFT adapter (LoRA on q and v, tokens on the embedding and the untied head), the base, and
    `edited(config_changes, drop_tensor)`, a copy of the adapter with a few changes."""
    peft = pytest.importorskip("peft")
    _, base, params = bases(False)
    hf_model = hf_bases(False)
    tmp_path = tmp_path_factory.mktemp("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             trainable_token_indices={"embed_tokens": [5, 17], "lm_head": [5]})
    peft.get_peft_model(copy.deepcopy(hf_model), config).save_pretrained(tmp_path / "good")
    load_peft_adapter(tmp_path / "good", base, params)  # it is fine as it is

    def edited(config_changes=None, drop_tensor=None):
        target = tmp_path / "edited"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(tmp_path / "good", target)
        config = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
        if drop_tensor:
            tensors = load_file(target / "adapter_model.safetensors")
            del tensors[next(k for k in sorted(tensors) if drop_tensor in k)]
            save_file(tensors, target / "adapter_model.safetensors")
        return target

    return base, params, edited


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "use_dora=True"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern="),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern="),
    ({"layers_to_transform": [0]}, "layers_to_transform="),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save="),
    ({"layer_replication": [[0, 1]]}, "layer_replication="),
    ({"bias": "all"}, "bias='all'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
    ({"task_type": "SEQ_CLS"}, "task_type 'SEQ_CLS'"),
    ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, "targets 'lm_head'"),
    ({"target_modules": ["q_proj", "v_proj", "embed_tokens"]}, "targets 'embed_tokens'"),
    ({"target_modules": r".*\.(q|v)_proj"}, "as the pattern"),
    ({"target_modules": ["q_proj"]}, "v_proj, which adapter_config.json does not target"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "lacks k_proj.lora_A"),
    ({"r": 8}, r"q_proj.lora_A has shape \[4, 64\] per layer, but r and the base's config.json imply \[8, 64\]"),
    ({"trainable_token_indices": [5, 17]}, "lm_head.token_adapter.trainable_tokens_delta, but"),
    ({"trainable_token_indices": {"embed_tokens": [5, 17], "lm_head": [5, 6]}}, r"shape \[1, 64\]"),
    ({"trainable_token_indices": {"embed_tokens": [5, 5], "lm_head": [5]}}, "token id 5 is listed twice"),
    ({"trainable_token_indices": {"embed_tokens": [5, 300], "lm_head": [5]}}, "token id 300.*resize_vocab"),
    ({"trainable_token_indices": {"embed_tokens": [5, 17], "norm": [5]}}, "names the layer 'norm'"),
])
def test_unsupported_adapters_are_refused_by_name(peft_adapter, changes, message):
    base, params, edited = peft_adapter
    with pytest.raises(JaxtokError, match=message):
        load_peft_adapter(edited(changes), base, params)


def test_broken_adapter_files_are_refused(peft_adapter):
    base, params, edited = peft_adapter
    with pytest.raises(JaxtokError, match=r"some layers only \(missing \[1\]\)"):
        load_peft_adapter(edited(drop_tensor="layers.1.self_attn.v_proj.lora_B"), base, params)
    with pytest.raises(JaxtokError, match="lacks .*lm_head.token_adapter"):
        load_peft_adapter(edited(drop_tensor="lm_head"), base, params)
    target = edited()
    (target / "adapter_model.safetensors").rename(target / "adapter_model.bin")
    with pytest.raises(JaxtokError, match="pickled adapter_model.bin"):
        load_peft_adapter(target, base, params)


def test_tied_heads_take_the_embedding_rows():
    tied = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    same = {"embed_tokens": [5, 7], "lm_head": [5, 7]}
    _, rows = read_adapter_config({"peft_type": "LORA", "trainable_token_indices": same}, tied)
    assert rows == TokenRows((5, 7), ())  # PEFT ties the head's table to the embedding's, as the list form does
    for indices in ({"embed_tokens": [5, 7], "lm_head": [5]}, {"lm_head": [5]}):
        with pytest.raises(JaxtokError, match="tied lm_head other ids"):
            read_adapter_config({"peft_type": "LORA", "trainable_token_indices": indices}, tied)
    lora, _ = read_adapter_config({"peft_type": "LORA"}, tied)
    assert lora == LoraConfig(rank=8, alpha=8, targets=("q_proj", "v_proj"))  # PEFT's defaults for Llama
