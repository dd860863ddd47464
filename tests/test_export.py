"""Back to Hugging Face: a PEFT adapter that PEFT loads, a merged checkpoint that transformers loads, both giving
jaxtok's outputs, written so that a failed export leaves nothing behind."""

from __future__ import annotations

import json
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
import transformers
from safetensors import safe_open

import tiny
from jaxtok import export
from jaxtok.convert import load_pretrained
from jaxtok.errors import JaxtokError
from jaxtok.evaluate import evaluate, tokenize_texts
from jaxtok.export import export_merged, export_peft
from jaxtok.lora import LoraConfig
from jaxtok.peft_format import to_peft
from jaxtok.tokenizer import load_tokenizer
from jaxtok.vocab import add_tokens, plan_rows

NEW = ("<|tool|>", "<|think|>")
TRAINED = (5, 17, 42)  # existing tokens whose rows train too
BASE_VOCAB = 300  # the tokenizer fills it, so adding tokens grows the vocabulary
SEQ_LEN = 24


@pytest.fixture(scope="module")
def setup(checkpoint, tmp_path_factory):
    """`setup(tied)`: a base with two added tokens, LoRA and token rows with random (non-trivial) values. Cached."""
    cache = {}

    def get(tied: bool):
        if tied not in cache:
            directory = checkpoint(tied=tied, vocab=BASE_VOCAB)
            tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
            tiny.make_tokenizer(tokenizer_dir)
            tokenizer = load_tokenizer(str(tokenizer_dir))
            base, params = load_pretrained(str(directory))
            params, config, added = add_tokens(tokenizer, params, base.config, NEW)
            # tied: rsLoRA on every linear map; untied: plain LoRA on a few, and the new tokens' head rows train
            lora = (LoraConfig(rank=4, alpha=8, targets="all-linear", rslora=True) if tied
                    else LoraConfig(rank=2, alpha=16, targets=("q_proj", "v_proj", "o_proj", "down_proj")))
            model = base.clone(config=config, lora=lora, token_rows=plan_rows(added, TRAINED, tied))
            adapters = _trained_adapters(model, params)
            tokens = np.array([[0, 5, added[0], 9, 17, 120, added[1], 42, 3, 77],
                               [0, added[1], 250, 42, 5, added[0], 1, 60, 299, 8]], np.int32)
            logits, _ = jax.jit(model.apply)({"params": params, **adapters}, tokens)
            cache[tied] = types.SimpleNamespace(directory=directory, tokenizer=tokenizer, params=params, added=added,
                                                model=model, adapters=adapters, tokens=tokens,
                                                logits=np.asarray(logits))
        return cache[tied]

    return get


def _trained_adapters(model, params, seed=1):
    """Adapters as training might leave them: non-zero B, token rows moved away from the base's rows."""

    def init(params):
        return model.apply({"params": params}, np.zeros((1, 1), np.int32), rngs={"params": jax.random.key(0)},
                           mutable=["lora", "tokens"])[1]

    shapes = nn.unbox(dict(jax.eval_shape(init, params)))  # the tree init_adapters makes, without compiling it
    rs = np.random.RandomState(seed)
    adapters = jax.tree.map(lambda x: 0.1 * rs.randn(*x.shape).astype(np.float32), shapes)
    rows = model.token_rows
    adapters["tokens"]["embed"] += np.asarray(params["embed"])[list(rows.embed_ids)]
    if rows.head_ids:
        adapters["tokens"]["head"] += np.asarray(params["lm_head"])[:, list(rows.head_ids)].T
    return adapters


def _tensors(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_peft_loads_the_adapter_with_jaxtok_outputs(setup, tiny_torch, tmp_path, tied):
    torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
    s = setup(tied)
    out = export_peft(tmp_path / "adapter", s.model, s.adapters, str(s.directory), s.tokenizer, added_ids=s.added)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no partial directory left beside it
    config = json.loads((out / "adapter_config.json").read_text())
    ids = list(s.model.token_rows.embed_ids)
    assert config["trainable_token_indices"] == (ids if tied else {"embed_tokens": ids, "lm_head": list(s.added)})
    assert f"resize_token_embeddings({BASE_VOCAB + len(NEW)})" in (out / "README.md").read_text()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == BASE_VOCAB + len(NEW) and tokenizer.convert_tokens_to_ids(NEW[0]) == s.added[0]

    # The user's recipe, twice: the resize draws the new rows at random, the adapter must override all of them.
    new_rows = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        base = transformers.AutoModelForCausalLM.from_pretrained(s.directory)
        base.resize_token_embeddings(len(tokenizer))
        new_rows.append(base.lm_head.weight[BASE_VOCAB:].detach().clone())
        peft_model = peft.PeftModel.from_pretrained(base, out).eval()
        assert tiny.rel_err(tiny_torch.hf_logits(peft_model, s.tokens), s.logits) < 1e-5
    assert not torch.equal(*new_rows)
    # PEFT's one-liner finds the base and the tokenizer, and resizes by itself
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
    assert tiny.rel_err(tiny_torch.hf_logits(auto, s.tokens), s.logits) < 1e-5

    # the same evaluation loss in both frameworks, on text that uses the new tokens
    rows = tokenize_texts(s.tokenizer, [t.replace(" ", f" {NEW[i % 2]} ", 1) for i, t in enumerate(tiny.CORPUS[:6])],
                          SEQ_LEN)
    ours = evaluate(s.model, {"params": s.params, **s.adapters}, rows, SEQ_LEN, progress=False)
    assert ours["tokens"] == sum(len(r) - 1 for r in rows)
    assert abs(ours["eval_loss"] - tiny_torch.eval_loss(peft_model, rows)) < 1e-5 * ours["eval_loss"]

    # What PEFT itself writes for the same adapter: same config values, tensor names, shapes, dtypes and metadata.
    peft_config = peft.LoraConfig(r=s.model.lora.rank, lora_alpha=int(s.model.lora.alpha),
                                  target_modules=list(s.model.lora.targets), use_rslora=s.model.lora.rslora,
                                  trainable_token_indices=config["trainable_token_indices"], task_type="CAUSAL_LM")
    base = transformers.AutoModelForCausalLM.from_pretrained(s.directory)
    base.resize_token_embeddings(len(tokenizer))
    reference = peft.get_peft_model(base, peft_config)
    result = peft.set_peft_model_state_dict(reference, {k: torch.from_numpy(v) for k, v in to_peft(s.adapters).items()})
    assert not result.unexpected_keys
    reference.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(config) <= set(theirs)
    for key in set(config) - {"target_modules"}:
        assert config[key] == theirs[key], key
    assert sorted(config["target_modules"]) == sorted(theirs["target_modules"])
    with safe_open(str(out / "adapter_model.safetensors"), "np") as a, \
            safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "np") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert (x.shape, x.dtype) == (y.shape, y.dtype) == (y.shape, np.float32), name
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_loads_the_merged_checkpoint(setup, tiny_torch, tmp_path, tied):
    torch = pytest.importorskip("torch")
    s = setup(tied)
    out = export_merged(tmp_path / "merged", s.model, s.params, s.adapters, s.tokenizer, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 1}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    V = BASE_VOCAB + len(NEW)
    assert hf.config.vocab_size == V and hf.config.tie_word_embeddings == tied
    assert hf.dtype == torch.float32 and len(transformers.AutoTokenizer.from_pretrained(out)) == V
    assert tiny.rel_err(tiny_torch.hf_logits(hf, s.tokens), s.logits) < 1e-5

    # rows of tokens that did not train are the base checkpoint's, bit for bit
    merged = {}
    for name in set(index["weight_map"].values()):
        merged.update(_tensors(out / name))
    base = _tensors(s.directory / "model.safetensors")
    rows = s.model.token_rows
    untouched = [i for i in range(BASE_VOCAB) if i not in rows.embed_ids]
    np.testing.assert_array_equal(merged["model.embed_tokens.weight"][untouched],
                                  base["model.embed_tokens.weight"][untouched])
    assert ("lm_head.weight" in merged) == (not tied)
    if not tied:
        untouched = [i for i in range(BASE_VOCAB) if i not in rows.head_ids]
        np.testing.assert_array_equal(merged["lm_head.weight"][untouched], base["lm_head.weight"][untouched])

    # bfloat16: the float32 merge rounded once
    out16 = export_merged(tmp_path / "merged16", s.model, s.params, s.adapters, s.tokenizer, dtype="bfloat16")
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(out16)
    assert hf16.dtype == torch.bfloat16 and json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, param in hf16.state_dict().items():
        expected = hf.state_dict()[name].to(torch.bfloat16)
        assert torch.equal(param, expected), name


def test_a_failed_export_leaves_nothing(setup, tmp_path, monkeypatch):
    s = setup(True)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    for write in (lambda out: export_peft(out, s.model, s.adapters, "base", s.tokenizer, added_ids=s.added),
                  lambda out: export_merged(out, s.model, s.params, s.adapters, s.tokenizer, max_shard_bytes=100_000)):
        with pytest.raises(OSError, match="No space"):
            write(tmp_path / "out")
        assert list(tmp_path.iterdir()) == []
    # overwriting: the old directory stays as it was until the new one is complete
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(OSError, match="No space"):
        export_merged(tmp_path / "out", s.model, s.params, s.adapters, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in (tmp_path / "out").iterdir()] == [
        "config.json"]


def test_existing_targets(setup, tmp_path):
    s = setup(True)

    def write(**kwargs):
        return export_peft(tmp_path / "out", s.model, s.adapters, "base", s.tokenizer, added_ids=s.added, **kwargs)

    (tmp_path / "out").mkdir()
    write()  # an empty directory is fine
    (tmp_path / "out" / "stale.txt").write_text("from an earlier run")
    with pytest.raises(JaxtokError, match="not empty"):
        write()
    assert (tmp_path / "out" / "stale.txt").exists()
    write(overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("")
    with pytest.raises(JaxtokError, match="is a file"):
        export_merged(tmp_path / "file", s.model, s.params, s.adapters, overwrite=True)


def test_adapters_peft_could_not_reproduce_are_refused(setup, tmp_path):
    s = setup(False)
    with pytest.raises(JaxtokError, match="no trained head rows"):
        no_head = s.model.clone(token_rows=plan_rows(s.added, TRAINED, tied=False, head="none"))
        export_peft(tmp_path / "a", no_head, s.adapters, "base", s.tokenizer, added_ids=s.added)
    with pytest.raises(JaxtokError, match="needs its tokenizer"):
        export_peft(tmp_path / "a", s.model, s.adapters, "base", added_ids=s.added)
    with pytest.raises(JaxtokError, match="one token_indices list for every layer"):  # no LoRA: TRAINABLE_TOKENS
        export_peft(tmp_path / "a", s.model.clone(lora=None), {"tokens": s.adapters["tokens"]}, "base")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_full_adapter_carries_the_whole_matrices(setup, tied, tmp_path):
    """lora+full: LoRA plus the trained embedding (and untied head) as PEFT's modules_to_save; PEFT ties a tied
    head to the trained embedding (ensure_weight_tying) and gives jaxtok's logits."""
    torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
    from jaxtok.tokens import TokenRows

    s = setup(tied)
    model = s.model.clone(token_rows=TokenRows())
    rs = np.random.RandomState(3)
    params = jax.tree.map(np.asarray, s.params)
    params["embed"] = params["embed"] + 0.05 * rs.randn(*params["embed"].shape).astype(np.float32)
    if not tied:
        params["lm_head"] = params["lm_head"] + 0.05 * rs.randn(*params["lm_head"].shape).astype(np.float32)
    adapters = {"lora": s.adapters["lora"]}
    want, _ = jax.jit(model.apply)({"params": params, **adapters}, s.tokens)
    export_peft(tmp_path / "adapter", model, adapters, str(s.directory), tokenizer=s.tokenizer,
                added_ids=s.added, full_params=params)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == (["embed_tokens"] if tied else ["embed_tokens", "lm_head"])
    assert config["ensure_weight_tying"] is tied
    base = transformers.AutoModelForCausalLM.from_pretrained(s.directory, dtype=torch.float32)
    base.resize_token_embeddings(len(s.tokenizer))
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = adapted(input_ids=torch.tensor(s.tokens, dtype=torch.long)).logits.numpy()
    assert tiny.rel_err(got, np.asarray(want)) < 1e-5
