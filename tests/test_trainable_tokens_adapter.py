"""PEFT's standalone trainable tokens (`TrainableTokensConfig`, peft_type TRAINABLE_TOKENS) both ways: a jaxtok model
with token rows and no LoRA exports an adapter that PEFT loads as it is, with jaxtok's logits and the files PEFT's own
save_pretrained writes; an adapter PEFT saved loads into jaxtok with PEFT's logits; what neither side can express is
refused with a one-line error."""

from __future__ import annotations

import copy
import json
import re
import shutil

import chex
import jax
import numpy as np
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tiny
from jaxtok.convert import load_pretrained
from jaxtok.errors import JaxtokError
from jaxtok.export import export_peft
from jaxtok.peft_import import apply_adapter, load_peft_adapter
from jaxtok.tokenizer import load_tokenizer
from jaxtok.tokens import TokenRows
from jaxtok.vocab import add_tokens

BASE_VOCAB = 300  # the tokenizer fills it, so added tokens grow the vocabulary
NEW = ("<|tool|>", "<|think|>")
TRAINED = (5, 17, 42)
EMBED = "base_model.model.model.embed_tokens.trainable_tokens_delta"
HEAD = "base_model.model.lm_head.trainable_tokens_delta"

# tied, tokens added, which rows the untied head trains ("same" ids as the embedding, "none", or "only" the head's)
EXPORTS = {
    "tied": dict(tied=True, add=False, head="none", targets=["embed_tokens"], tensors={EMBED, HEAD}),
    "tied-added": dict(tied=True, add=True, head="none", targets=["embed_tokens"], tensors={EMBED, HEAD}),
    "untied-added": dict(tied=False, add=True, head="same", targets=["embed_tokens", "lm_head"],
                         tensors={EMBED, HEAD}),
    "untied-embed": dict(tied=False, add=False, head="none", targets=["embed_tokens"], tensors={EMBED}),
    "untied-head": dict(tied=False, add=False, head="only", targets=["lm_head"], tensors={HEAD}),
}


@pytest.fixture(scope="module")
def bases(checkpoint, tmp_path_factory):
    """`bases(tied)` -> (checkpoint directory, jaxtok base, params, tokenizer directory). Cached."""
    cache = {}
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tiny.make_tokenizer(tokenizer_dir)

    def get(tied):
        if tied not in cache:
            directory = checkpoint(tied=tied, vocab=BASE_VOCAB)
            cache[tied] = (directory, *load_pretrained(str(directory)), tokenizer_dir)
        return cache[tied]

    return get


@pytest.fixture(scope="module")
def hf_bases(torch_checkpoint):
    """`hf_bases(tied)` -> transformers' torch model of the same checkpoint as `bases(tied)`."""
    return lambda tied: torch_checkpoint(tied=tied, vocab=BASE_VOCAB)[1]


def _tokens(vocab):
    return np.array([[0, 5, 9, 17, 120, 42, 3, 77, vocab - 1, 8], [0, vocab - 2, 250, 42, 5, 1, 60, 17, 8, 2]],
                    np.int32)


def _jax_logits(model, params, adapters, tokens):
    logits, _ = jax.jit(model.apply)({"params": params, **adapters}, tokens)
    return np.asarray(logits)


def _rows_of(params, rows, rs):
    """Token tables moved away from the base's rows, as training leaves them."""
    tables = {}
    if rows.embed_ids:
        tables["embed"] = np.asarray(params["embed"])[list(rows.embed_ids)]
    if rows.head_ids:
        tables["head"] = np.asarray(params["lm_head"])[:, list(rows.head_ids)].T
    return {k: (v + 0.1 * rs.randn(*v.shape)).astype(np.float32) for k, v in tables.items()}


def _tensors(path):
    with safe_open(str(path), framework="np") as f:
        return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}


def _error(call) -> str:
    """The message of the JaxtokError `call` raises, which must be one line."""
    with pytest.raises(JaxtokError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("case", EXPORTS)
def test_peft_loads_the_exported_adapter_with_jaxtok_logits(bases, tiny_torch, tmp_path, case):
    torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
    spec = EXPORTS[case]
    directory, base, params, tokenizer_dir = bases(spec["tied"])
    tokenizer = load_tokenizer(str(tokenizer_dir))
    added = ()
    if spec["add"]:
        params, config, added = add_tokens(tokenizer, params, base.config, NEW)
        base = base.clone(config=config)
    ids = tuple(added) + TRAINED
    rows = TokenRows(() if spec["head"] == "only" else ids, ids if spec["head"] in ("same", "only") else ())
    model = base.clone(lora=None, token_rows=rows)
    adapters = {"tokens": _rows_of(params, rows, np.random.RandomState(0))}
    vocab = model.config.vocab_size
    tokens = _tokens(vocab)
    logits = _jax_logits(model, params, adapters, tokens)
    assert tiny.rel_err(logits, _jax_logits(base, params, {}, tokens)) > 1e-3  # the tables do change the outputs

    out = export_peft(tmp_path / "adapter", model, adapters, str(directory), tokenizer if added else None,
                      added_ids=added)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["target_modules"], config["token_indices"]) == (
        "TRAINABLE_TOKENS", spec["targets"], list(ids))
    metadata, tensors = _tensors(out / "adapter_model.safetensors")
    assert set(tensors) == spec["tensors"]
    if spec["tied"]:  # the tied head's copy of the embedding's table
        np.testing.assert_array_equal(tensors[HEAD], tensors[EMBED])
    card = (out / "README.md").read_text()
    assert "Trainable-tokens adapter" in card and (f"resize_token_embeddings({vocab})" in card) == bool(added)

    # PEFT, as its users load an adapter: the base (resized when tokens were added, which draws the new rows at
    # random), then the adapter directory as it is
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(directory)
    if added:
        assert len(transformers.AutoTokenizer.from_pretrained(out)) == vocab
        base_hf.resize_token_embeddings(vocab)
    peft_model = peft.PeftModel.from_pretrained(base_hf, out).eval()
    assert tiny.rel_err(tiny_torch.hf_logits(peft_model, tokens), logits) < 1e-5
    if added:  # PEFT's one-liner finds the base class (auto_mapping), the tokenizer, and resizes by itself
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
        assert tiny.rel_err(tiny_torch.hf_logits(auto, tokens), logits) < 1e-5

    # What PEFT's own save_pretrained writes for the same adapter: the same config, tensor names, values, metadata
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(directory)
    base_hf.resize_token_embeddings(vocab)
    reference = peft.get_peft_model(base_hf, peft.TrainableTokensConfig(token_indices=list(ids),
                                                                        target_modules=spec["targets"]))
    result = peft.set_peft_model_state_dict(reference, {k: torch.from_numpy(v) for k, v in tensors.items()})
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "trainable_tokens" in k]
    reference.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs.pop("peft_version")  # which PEFT wrote it; jaxtok's adapters are not written by PEFT
    assert config == {**theirs, "base_model_name_or_path": str(directory)}
    their_metadata, their_tensors = _tensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert metadata == their_metadata and set(their_tensors) == set(tensors)
    for name, value in tensors.items():
        assert their_tensors[name].dtype == value.dtype == np.float32
        np.testing.assert_array_equal(their_tensors[name], value)

    # and back into jaxtok, on a fresh base grown as PEFT users grow theirs: the same tables and logits
    _, fresh, fresh_params, _ = bases(spec["tied"])
    loaded, loaded_params, back, _ = apply_adapter(out, fresh, fresh_params, load_tokenizer(str(tokenizer_dir)))
    assert loaded.lora is None and loaded.token_rows == rows and loaded.config == model.config
    chex.assert_trees_all_equal(jax.device_get(back), adapters)
    assert tiny.rel_err(_jax_logits(loaded, loaded_params, back, tokens), logits) < 1e-5


# PEFT configs as users write them: target_modules None (PEFT writes the embedding's name as a pattern), lists
IMPORTS = {
    "tied-default": dict(tied=True, added=False, ids=[5, 17, 42], targets=None),
    "tied-added": dict(tied=True, added=True, ids=[BASE_VOCAB, 17, BASE_VOCAB + 1], targets=["embed_tokens"]),
    "untied-added": dict(tied=False, added=True, ids=[BASE_VOCAB, BASE_VOCAB + 1, 5],
                         targets=["embed_tokens", "lm_head"]),
    "untied-head": dict(tied=False, added=False, ids=[5, 42], targets=["lm_head"]),
}


def _peft_adapter(hf_model, vocab, ids, targets, out, seed=0):
    """A PEFT trainable-tokens model with its tables moved away from the base's rows, saved to `out`."""
    import peft
    import torch

    hf_model = copy.deepcopy(hf_model)
    if vocab != hf_model.config.vocab_size:
        hf_model.resize_token_embeddings(vocab)
    model = peft.get_peft_model(hf_model, peft.TrainableTokensConfig(token_indices=ids, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out, save_embedding_layers=False)
    return model.eval()


@pytest.mark.parametrize("case", IMPORTS)
def test_an_adapter_peft_saved_gives_peft_logits(bases, hf_bases, tiny_torch, tmp_path, case):
    pytest.importorskip("peft")
    spec = IMPORTS[case]
    _, base, params, tokenizer_dir = bases(spec["tied"])
    hf_model = hf_bases(spec["tied"])
    tokenizer = load_tokenizer(str(tokenizer_dir))
    vocab = BASE_VOCAB
    if spec["added"]:
        tokenizer.add_tokens(list(NEW), special_tokens=True)
        vocab = len(tokenizer)
    out = tmp_path / "adapter"
    peft_model = _peft_adapter(hf_model, vocab, spec["ids"], spec["targets"], out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["task_type"] is None
    if spec["targets"] is None:
        assert config["target_modules"] == "model.embed_tokens"
    if spec["added"]:
        tokenizer.save_pretrained(str(out))
        with pytest.raises(JaxtokError, match="resize_vocab"):  # the base needs the adapter's rows first
            load_peft_adapter(out, base, params)

    model, params, adapters, _ = apply_adapter(out, base, params, load_tokenizer(str(tokenizer_dir)))
    ids = tuple(spec["ids"])
    head = spec["targets"] is not None and "lm_head" in spec["targets"]
    embed = spec["targets"] is None or "embed_tokens" in spec["targets"]
    assert model.lora is None and model.config.vocab_size == vocab
    assert model.token_rows == TokenRows(ids if embed else (), ids if head else ())
    tokens = _tokens(vocab)
    assert tiny.rel_err(_jax_logits(model, params, adapters, tokens), tiny_torch.hf_logits(peft_model, tokens)) < 1e-5

    if spec["added"]:
        # PEFT's default for a resized base also saves the whole matrices: refused, with the fix
        peft_model.save_pretrained(tmp_path / "full", save_embedding_layers=True)
        assert "save_embedding_layers=False" in _error(lambda: load_peft_adapter(tmp_path / "full", model, params))


def test_what_peft_cannot_express_is_not_exported(bases, tmp_path):
    _, base, params, tokenizer_dir = bases(False)
    rs = np.random.RandomState(0)

    def export(rows, **kwargs):
        model = base.clone(lora=None, token_rows=rows)
        return export_peft(tmp_path / "out", model, {"tokens": _rows_of(params, rows, rs)}, "base", **kwargs)

    assert "neither LoRA nor token rows" in _error(lambda: export(TokenRows()))
    # one token_indices list for every layer: an untied head cannot train other ids than the embedding
    for rows in (TokenRows((5, 17), (5,)), TokenRows((5, 17), (17, 5))):
        assert "one token_indices list for every layer" in _error(lambda rows=rows: export(rows))
    tokenizer = load_tokenizer(str(tokenizer_dir))
    grown, config, added = add_tokens(tokenizer, params, base.config, NEW)
    rows = TokenRows(added, ())
    model = base.clone(config=config, lora=None, token_rows=rows)
    tables = {"tokens": _rows_of(grown, rows, rs)}
    message = _error(lambda: export_peft(tmp_path / "out", model, tables, "base", tokenizer, added_ids=added))
    assert "no trained head rows" in message  # PEFT users' resize would give the new tokens random head rows
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def peft_saved(bases, hf_bases, tmp_path_factory):
    """`peft_saved(tied)` -> (base, params, edited): `edited(config_changes, tensors)` is a copy of an untrained PEFT
    adapter on token ids 5 and 17 (untied: embed_tokens and lm_head; tied: PEFT's default targets) with its config
    updated and `tensors(dict)` applied to its tensors."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("peft_saved")

    def get(tied):
        _, base, params, _ = bases(tied)
        hf_model = hf_bases(tied)
        good = root / f"good-{tied}"
        if not good.exists():
            targets = None if tied else ["embed_tokens", "lm_head"]
            _peft_adapter(hf_model, BASE_VOCAB, [5, 17], targets, good)
            load_peft_adapter(good, base, params)  # it is fine as it is

        def edited(config_changes=None, tensors=None):
            target = root / "edited"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(good, target)
            config = json.loads((target / "adapter_config.json").read_text())
            (target / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
            if tensors:
                arrays = load_file(target / "adapter_model.safetensors")
                tensors(arrays)
                save_file(arrays, target / "adapter_model.safetensors")
            return target

        return base, params, edited

    return get


@pytest.mark.parametrize("tied, changes, message", [
    (False, {"target_modules": ["embed_tokens", "q_proj"]}, "targets 'q_proj', which matches model.layers.0.self_attn"),
    (False, {"target_modules": ["embed_tokens", "norm"]}, "targets 'norm', which matches model.norm"),
    (False, {"target_modules": ".*"}, "targets '.*', which matches model"),
    (False, {"target_modules": ["wte", "lm_head"]}, "targets 'wte', which names no module"),
    (False, {"target_modules": "(embed"}, "not a valid regular expression"),
    (False, {"target_modules": []}, "empty target_modules"),
    (False, {"target_modules": ["embed_tokens"]}, f"adapter has {HEAD}, but adapter_config.json names no token ids"),
    (False, {"token_indices": []}, "non-empty list of token ids"),
    (False, {"token_indices": [5, 5]}, "token id 5 is listed twice"),
    (False, {"token_indices": [5, BASE_VOCAB]}, f"token id {BASE_VOCAB}.*resize_vocab"),
    (False, {"token_indices": [5]}, rf"{EMBED} has shape \[2, 64\], but 1 ids"),
    (False, {"task_type": "SEQ_CLS"}, "task_type 'SEQ_CLS'"),
    (False, {"exclude_modules": ["lm_head"]}, "sets exclude_modules=\\['lm_head'\\]"),
    (False, {"r": 8}, "sets r=8"),
    (False, {"peft_type": "LOHA"}, "peft_type 'LOHA'"),
    (True, {"target_modules": ["embed_tokens", "lm_head"]}, "targets lm_head, but the base ties its head"),
    (True, {"target_modules": ["lm_head"]}, "targets lm_head, but the base ties its head"),
])
def test_unsupported_adapters_are_refused_by_name(peft_saved, tied, changes, message):
    base, params, edited = peft_saved(tied)
    assert re.search(message, _error(lambda: load_peft_adapter(edited(changes), base, params)))


def test_broken_tensor_files_are_refused(peft_saved):
    base, params, edited = peft_saved(False)
    # PEFT matches a string as a pattern for the whole name: this one names both layers, and is fine
    model, _ = load_peft_adapter(edited({"target_modules": r"(model\.embed_tokens|lm_head)"}), base, params)
    assert model.token_rows == TokenRows((5, 17), (5, 17))

    message = _error(lambda: load_peft_adapter(edited(tensors=lambda t: t.pop(HEAD)), base, params))
    assert f"lacks {HEAD}, which token_indices with target_modules implies" in message

    def lora_names(t):  # a LoRA adapter's names (token_adapter) are not this method's
        t[EMBED.replace(".trainable", ".token_adapter.trainable")] = t.pop(EMBED)

    assert "token_adapter.trainable_tokens_delta is not a LoRA matrix or token table" in _error(
        lambda: load_peft_adapter(edited(tensors=lora_names), base, params))

    base, params, edited = peft_saved(True)
    model, adapters = load_peft_adapter(edited(tensors=lambda t: t.pop(HEAD)), base, params)  # the copy may be absent
    assert model.token_rows == TokenRows((5, 17), ()) and set(adapters["tokens"]) == {"embed"}

    def different_head(t):
        t[HEAD] = t[HEAD] + 1.0

    message = _error(lambda: load_peft_adapter(edited(tensors=different_head), base, params))
    assert f"{HEAD} differs from {EMBED}, but the base ties its head" in message
