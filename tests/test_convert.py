"""Loading HF checkpoints: dtypes, shards, both config.json spellings, pickles, and every error a user can fix."""

from __future__ import annotations

import json
import os
import re
import shutil

import chex
import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import tiny
from jaxtok.convert import load_config, load_pretrained
from jaxtok.errors import JaxtokError

TOL = 1e-5


def batch(seed=0):
    return tiny.left_padded([10, 7], 10, seed=seed)


def logits_of(directory, **kwargs):
    model, params = load_pretrained(str(directory), **kwargs)
    tokens, mask, positions = batch()
    return tiny.jax_logits(model, params, tokens, positions, mask), mask


def hf_logits_of(tiny_torch, hf):
    tokens, mask, positions = batch()
    return tiny_torch.hf_logits(hf, tokens, mask, positions)


# ---------------------------------------------------------------------------------------------------- dtypes


def test_bf16_checkpoint_as_float32(torch_checkpoint, tiny_torch):
    """dtype=float32 upcasts the bf16 weights exactly: HF's float32 logits of the bf16-rounded weights."""
    directory, hf = torch_checkpoint(dtype="bfloat16")
    model, params = load_pretrained(str(directory), dtype="float32")
    assert model.config.checkpoint_dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    ours, mask = logits_of(directory, dtype="float32")
    real = mask.astype(bool)
    assert tiny.rel_err(ours[real], hf_logits_of(tiny_torch, hf)[real]) <= TOL


def test_bf16_checkpoint_as_bfloat16(torch_checkpoint, tiny_torch):
    directory, hf = torch_checkpoint(dtype="bfloat16")
    _, params32 = load_pretrained(str(directory), dtype="float32")
    model, params = load_pretrained(str(directory), dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}
    # bf16 -> bf16 is lossless: the same values as the float32 load.
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a.astype(np.float32), params), params32)
    tokens, mask, positions = batch()
    logits, _ = jax.jit(model.apply)({"params": params}, tokens, positions, mask)
    assert logits.dtype == jax.numpy.bfloat16
    real = mask.astype(bool)
    err = tiny.rel_err(np.asarray(logits.astype(np.float32))[real], hf_logits_of(tiny_torch, hf)[real])
    assert err <= 5e-2, f"bf16 compute is {err:.2e} off"
    # Params in bf16, activations in float32: exact again.
    ours, _ = logits_of(directory, dtype="bfloat16", compute_dtype="float32")
    assert tiny.rel_err(ours[real], hf_logits_of(tiny_torch, hf)[real]) <= TOL


def test_fp16_checkpoint(torch_checkpoint, tiny_torch):
    directory, hf = torch_checkpoint(dtype="float16")
    model, _ = load_pretrained(str(directory))
    assert model.config.checkpoint_dtype == "float16"
    ours, mask = logits_of(directory)
    real = mask.astype(bool)
    assert tiny.rel_err(ours[real], hf_logits_of(tiny_torch, hf)[real]) <= TOL


def test_unsupported_dtype(checkpoint):
    directory = checkpoint()
    with pytest.raises(JaxtokError, match=r"dtype 'float64' is not supported"):
        load_pretrained(str(directory), dtype="float64")


# ---------------------------------------------------------------------------------------------------- layouts


SHARDS = 100_000  # bytes: the tiny checkpoint in 5 shards


def test_sharded_equals_unsharded(checkpoint):
    sharded, single = checkpoint(max_shard_bytes=SHARDS), checkpoint()
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 3
    model, params_sharded = load_pretrained(str(sharded))
    _, params_single = load_pretrained(str(single))
    chex.assert_trees_all_equal(params_sharded, params_single)
    tokens, mask, positions = batch()
    apply = jax.jit(model.apply)
    a = np.asarray(apply({"params": params_sharded}, tokens, positions, mask)[0])
    b = np.asarray(apply({"params": params_single}, tokens, positions, mask)[0])
    np.testing.assert_array_equal(a, b)


def test_sharded_matches_transformers(torch_checkpoint, tiny_torch):
    """transformers reads the same shards as the same model."""
    sharded, hf = torch_checkpoint(max_shard_bytes=SHARDS)
    ours, mask = logits_of(sharded)
    real = mask.astype(bool)
    assert tiny.rel_err(ours[real], hf_logits_of(tiny_torch, hf)[real]) <= TOL


ROPES = {
    "default": {"rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0,
    },
}


@pytest.mark.parametrize("spelling", ["v4", "v4-type"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_config_spellings_agree(tmp_path, rope, spelling):
    """transformers 4 / Meta spelling (rope_theta, rope_scaling, torch_dtype) reads like transformers 5's."""
    hf = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **ROPES[rope]},
    )
    hf.dtype = "bfloat16"
    v5, old = tmp_path / "v5", tmp_path / "old"
    hf.save_pretrained(v5)
    shutil.copytree(v5, old)
    written = tiny.rewrite_config_v4(old, use_type_key=spelling == "v4-type")
    assert "rope_parameters" not in written and "dtype" not in written and written["torch_dtype"] == "bfloat16"
    assert (written["rope_scaling"] is None) == (rope == "default")
    config = load_config(v5)
    assert load_config(old) == config
    assert config.rope.type == rope
    assert config.rope.theta == ROPES[rope].get("rope_theta", 10000.0)
    assert config.checkpoint_dtype == "bfloat16"
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key in ROPES[rope]:
            assert getattr(config.rope, key) == ROPES[rope][key]


def test_config_spellings_give_identical_logits(checkpoint, torch_checkpoint, tiny_torch):
    rope = {**ROPES["llama3"], "rope_theta": 50000.0}
    v5, hf = torch_checkpoint(rope=rope, max_position_embeddings=128)
    v4 = checkpoint(rope=rope, max_position_embeddings=128, spelling="v4")
    assert "rope_scaling" in json.loads((v4 / "config.json").read_text())
    model5, params5 = load_pretrained(str(v5))
    model4, params4 = load_pretrained(str(v4))
    assert model4.config == model5.config
    tokens, mask, positions = tiny.left_padded([40, 30], 40, seed=7)
    apply = jax.jit(model5.apply)
    a = np.asarray(apply({"params": params5}, tokens, positions, mask)[0])
    b = np.asarray(apply({"params": params4}, tokens, positions, mask)[0])
    np.testing.assert_array_equal(a, b)
    real = mask.astype(bool)
    assert tiny.rel_err(a[real], tiny_torch.hf_logits(hf, tokens, mask, positions)[real]) <= TOL


def test_rotary_inv_freq_buffers_are_ignored(copy_checkpoint, torch_checkpoint, tiny_torch):
    """Old conversions saved `rotary_emb.inv_freq`; it holds nothing to load."""
    directory, (_, hf) = copy_checkpoint(), torch_checkpoint()
    path = directory / "model.safetensors"
    state = load_file(path)
    for i in range(2):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(state, path, metadata={"format": "pt"})
    ours, mask = logits_of(directory)
    real = mask.astype(bool)
    assert tiny.rel_err(ours[real], hf_logits_of(tiny_torch, hf)[real]) <= TOL


def test_pickle_only_needs_opt_in(copy_checkpoint, torch_checkpoint, tiny_torch):
    import torch

    directory, (_, hf) = copy_checkpoint(), torch_checkpoint()
    os.remove(directory / "model.safetensors")
    torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(JaxtokError, match=r"only pickled weights \(pytorch_model\.bin\).*allow_pickle=True"):
        load_pretrained(str(directory))
    ours, mask = logits_of(directory, allow_pickle=True)
    real = mask.astype(bool)
    assert tiny.rel_err(ours[real], hf_logits_of(tiny_torch, hf)[real]) <= TOL


def test_safetensors_preferred_over_pickle(copy_checkpoint):
    """With both present, the pickle is never opened (a corrupt one does not matter) and no opt-in is needed."""
    directory = copy_checkpoint()
    (directory / "pytorch_model.bin").write_bytes(b"not a pickle")
    load_pretrained(str(directory))


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(JaxtokError, match=r"model directory .*missing.* does not exist"):
        load_pretrained(str(tmp_path / "missing"))
    with pytest.raises(JaxtokError, match=r"does not exist"):
        load_pretrained("missing-relative-dir")


def test_missing_directory_as_path(tmp_path):
    with pytest.raises(JaxtokError, match=r"does not exist"):
        load_pretrained(tmp_path / "missing")


def test_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(JaxtokError, match=r"'no-such-org/no-such-model' is not a local directory and could not be"):
        load_pretrained("no-such-org/no-such-model")


def test_file_instead_of_directory(checkpoint):
    directory = checkpoint()
    with pytest.raises(JaxtokError, match=r"is a file; pass the checkpoint's directory"):
        load_pretrained(str(directory / "config.json"))


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(JaxtokError, match=r"has no config\.json"):
        load_pretrained(str(tmp_path))


def test_config_not_json(copy_checkpoint):
    directory = copy_checkpoint()
    (directory / "config.json").write_text("{not json")
    with pytest.raises(JaxtokError, match=r"config\.json is not valid JSON"):
        load_pretrained(str(directory))


def test_config_lacking_a_key(copy_checkpoint):
    directory = copy_checkpoint()
    tiny.edit_config(directory, hidden_size=...)
    with pytest.raises(JaxtokError, match=r"lacks the key 'hidden_size'"):
        load_pretrained(str(directory))


def test_unsupported_architecture(tmp_path):
    """Gemma is Llama-like too, but not one of the families jaxtok computes: refused by name (test_families has
    Mistral, Qwen2 and Qwen3)."""
    config = transformers.GemmaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )
    config.architectures = ["GemmaForCausalLM"]  # as GemmaForCausalLM.save_pretrained writes it
    config.save_pretrained(tmp_path)
    with pytest.raises(JaxtokError, match=r"does not support GemmaForCausalLM: it loads LlamaForCausalLM"):
        load_pretrained(str(tmp_path))


def test_no_weights(tmp_path, checkpoint):
    directory = checkpoint()
    shutil.copy(directory / "config.json", tmp_path)
    with pytest.raises(JaxtokError, match=r"has no weights: expected model\.safetensors"):
        load_pretrained(str(tmp_path))


def _data_start(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_truncated_safetensors(copy_checkpoint):
    directory = copy_checkpoint()
    path = directory / "model.safetensors"
    start, size = _data_start(path), path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(start + (size - start) // 2)  # cut in the data section; the header is intact
    with pytest.raises(JaxtokError, match=re.escape(str(path)) + r" is truncated or corrupt"):
        load_pretrained(str(directory))


def test_truncated_shard(copy_checkpoint):
    directory = copy_checkpoint(max_shard_bytes=SHARDS)
    path = sorted(directory.glob("model-*-of-*.safetensors"))[1]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(JaxtokError, match=re.escape(path.name) + r" is truncated or corrupt"):
        load_pretrained(str(directory))


@pytest.mark.parametrize("damage", ["garbage-header", "huge-header-length", "empty-file", "cut-in-header"])
def test_corrupt_safetensors_header(copy_checkpoint, damage):
    directory = copy_checkpoint()
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "garbage-header":
        data[8:40] = b"#" * 32
    elif damage == "huge-header-length":
        data[:8] = (10**12).to_bytes(8, "little")
    elif damage == "empty-file":
        data = b""
    else:
        data = data[:100]
    path.write_bytes(bytes(data))
    with pytest.raises(JaxtokError, match=r"model\.safetensors is truncated or corrupt"):
        load_pretrained(str(directory))


def _resave(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"]
)
def test_missing_tensor(copy_checkpoint, name):
    directory = copy_checkpoint()
    _resave(directory, lambda state: state.pop(name))
    with pytest.raises(JaxtokError, match=r"checkpoint lacks tensors: " + re.escape(name)):
        load_pretrained(str(directory))


@pytest.mark.parametrize(
    "name, shape",
    [("model.layers.0.self_attn.q_proj.bias", (64,)), ("model.layers.2.mlp.up_proj.weight", (128, 64))],
    ids=["bias", "extra-layer"],
)
def test_unexpected_tensor(copy_checkpoint, name, shape):
    directory = copy_checkpoint()
    _resave(directory, lambda state: state.__setitem__(name, np.zeros(shape, np.float32)))
    with pytest.raises(JaxtokError, match=r"tensors that a LlamaForCausalLM of this config\.json does not: "
                                          + re.escape(name)):
        load_pretrained(str(directory))


def test_shape_mismatch(copy_checkpoint):
    directory = copy_checkpoint()
    tiny.edit_config(directory, intermediate_size=96)
    with pytest.raises(
        JaxtokError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight in model\.safetensors has shape .*96"
    ):
        load_pretrained(str(directory))


def test_heads_not_dividing(copy_checkpoint):
    directory = copy_checkpoint()
    tiny.edit_config(directory, num_key_value_heads=3)
    with pytest.raises(JaxtokError, match=r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        load_pretrained(str(directory))


def test_index_lists_missing_shard(copy_checkpoint):
    directory = copy_checkpoint(max_shard_bytes=SHARDS)
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(JaxtokError, match=r"lacks shards listed in model\.safetensors\.index\.json: " + shard.name):
        load_pretrained(str(directory))


@pytest.mark.parametrize("spelling", ["v5", "v4"])
@pytest.mark.parametrize("rope_type", ["yarn", "longrope"])
def test_unsupported_rope_type(copy_checkpoint, spelling, rope_type):
    directory = copy_checkpoint(spelling=spelling)
    rope = {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 32}
    if spelling == "v5":
        tiny.edit_config(directory, rope_parameters={**rope, "rope_theta": 10000.0})
    else:
        tiny.edit_config(directory, rope_scaling=rope)
    with pytest.raises(JaxtokError, match=rf"RoPE type '{rope_type}' is not supported"):
        load_pretrained(str(directory))


@pytest.mark.parametrize("key, tensor", [("attention_bias", "self_attn.k_proj.bias"),
                                         ("mlp_bias", "mlp.down_proj.bias")])
def test_biases_in_config_need_their_tensors(copy_checkpoint, key, tensor):
    """A Llama with biases loads (test_families checks its logits); config.json promising biases the checkpoint
    lacks is refused, naming the missing ones (sorted)."""
    directory = copy_checkpoint()
    tiny.edit_config(directory, **{key: True})
    with pytest.raises(JaxtokError, match=r"checkpoint lacks tensors: model\.layers\.0\." + re.escape(tensor)):
        load_pretrained(str(directory))


def test_truncated_pickle(copy_checkpoint, torch_checkpoint):
    import torch

    directory, (_, hf) = copy_checkpoint(), torch_checkpoint()
    os.remove(directory / "model.safetensors")
    path = directory / "pytorch_model.bin"
    torch.save(hf.state_dict(), path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(JaxtokError, match=r"pytorch_model\.bin"):
        load_pretrained(str(directory), allow_pickle=True)
