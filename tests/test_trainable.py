"""What trains, what the optimizer does with it, and what training may change."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny
from jaxtok import trainable
from jaxtok.convert import load_pretrained
from jaxtok.errors import JaxtokError
from jaxtok.lora import TARGETS, LoraConfig
from jaxtok.merge import merge_adapters
from jaxtok.optimizer import OptimConfig, make_optimizer, schedule
from jaxtok.step import init_state, make_train_step
from jaxtok.tokens import TokenRows

IDS = (7, 11, 300)
TRAINS = pytest.mark.slow  # compiles and runs train steps


LORA = LoraConfig(rank=4, alpha=8, targets="all-linear")


def _setup(checkpoint, tied, lora=LORA, seed=0):
    directory = checkpoint(tied=tied)
    base, params = load_pretrained(str(directory))
    model = base.clone(lora=lora, token_rows=TokenRows(IDS, () if tied else IDS))
    adapters = trainable.init_adapters(model, params, jax.random.key(seed))
    return base, model, params, adapters


def _batch(A=1, B=4, T=16, seed=0):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, 320, (A, B, T))
    chosen = rs.rand(A, B, T) < 0.3
    tokens[chosen] = rs.choice(IDS, chosen.sum())
    ones = np.ones((A, B, T), np.int32)
    return dict(tokens=jnp.asarray(tokens), positions=jnp.asarray(np.broadcast_to(np.arange(T), (A, B, T))),
                segment_ids=jnp.asarray(ones), loss_mask=jnp.asarray(ones))


def test_labels_cover_every_variable(checkpoint):
    _, model, params, adapters = _setup(checkpoint, tied=False)
    variables = {"params": params, **adapters}
    labels = trainable.labels(variables)
    assert set(jax.tree.leaves(labels["params"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["lora"])) == {"lora"}
    assert labels["tokens"] == {"embed": "tokens", "head": "tokens"}
    full = trainable.labels(variables, "lora+full")
    assert full["params"]["embed"] == full["params"]["lm_head"] == "embeddings"
    assert full["params"]["final_norm"]["scale"] == "frozen"
    with pytest.raises(ValueError, match="unknown variable collection"):
        trainable.label(("cache", "k"))
    # split puts every leaf on exactly one side, and merge undoes it
    train, frozen = trainable.split(variables)
    assert set(train) == {"lora", "tokens"} and set(frozen) == {"params"}
    chex.assert_trees_all_equal(trainable.merge(frozen, train), variables)
    train, frozen = trainable.split(variables, "lora+full")
    assert set(train["params"]) == {"embed", "lm_head"} and "embed" not in frozen["params"]
    # each method trains its own part of the same variables; the rest stays frozen
    for method, trained in {"lora": {"lora"}, "lora+rows": {"lora", "tokens"}, "lora+full": {"lora", "params"},
                            "rows": {"tokens"}}.items():
        train, frozen = trainable.split(variables, method)
        assert set(train) == trained, method
        chex.assert_trees_all_equal(trainable.merge(frozen, train), variables)
    with pytest.raises(JaxtokError, match="unknown method 'full'; choose from lora, lora\\+rows, lora\\+full, rows"):
        trainable.label(("lora", "a"), "full")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fresh_adapter_gives_the_base_logits_exactly(checkpoint, tied):
    base, model, params, adapters = _setup(checkpoint, tied)
    assert float(jnp.abs(adapters["lora"]["layers"]["attn"]["q_proj"]["b"]).max()) == 0.0
    a = adapters["lora"]["layers"]["mlp"]["down_proj"]["a"]  # [L, R, F]
    assert a.dtype == jnp.float32 and float(jnp.abs(a).max()) <= 1 / math.sqrt(a.shape[-1])
    tokens = _batch()["tokens"][0]
    ref, _ = base.apply({"params": params}, tokens)
    out, _ = model.apply({"params": params, **adapters}, tokens)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@TRAINS
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_training_changes_only_the_chosen_rows(checkpoint, tied):
    base, model, params, adapters = _setup(checkpoint, tied)
    train, frozen = trainable.split({"params": params, **adapters})
    config = OptimConfig(lr=1e-2, token_lr=1e-1, schedule="constant", total_steps=3)
    optimizer = make_optimizer(config, trainable.labels(train))
    step = make_train_step(model, optimizer, schedule(config, config.lr))
    state = init_state(train, optimizer, seed=0)
    for seed in range(3):
        state, metrics = step(state, frozen, _batch(seed=seed))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["tokens"]) == 4 * 15
    merged = merge_adapters(model, params, state.trainable)
    changed = np.flatnonzero(np.any(np.asarray(merged["embed"]) != np.asarray(params["embed"]), axis=1))
    assert tuple(changed) == tuple(sorted(IDS))
    if tied:
        assert "lm_head" not in merged
    else:
        changed = np.flatnonzero(np.any(np.asarray(merged["lm_head"]) != np.asarray(params["lm_head"]), axis=0))
        assert tuple(changed) == tuple(sorted(IDS))
    # the merged base computes what base + adapters compute
    tokens = _batch(seed=5)["tokens"][0]
    expected, _ = model.apply(trainable.merge(frozen, state.trainable), tokens)
    got, _ = base.apply({"params": merged}, tokens)
    assert tiny.rel_err(np.asarray(got), np.asarray(expected)) < 1e-5


@TRAINS
def test_gradient_accumulation_weights_micro_batches_by_their_tokens(checkpoint):
    _, model, params, adapters = _setup(checkpoint, tied=True)
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # non-zero B, so every leaf has a gradient
    train, frozen = trainable.split({"params": params, **adapters})
    # plain SGD makes the update a multiple of the gradient; a large rate keeps it well above the parameters' rounding
    sgd = optax.sgd(100.0)
    step = make_train_step(model, sgd, optax.constant_schedule(100.0), donate=False)
    batch = _batch(A=2, B=2)
    batch["loss_mask"] = batch["loss_mask"].at[0, :, 8:].set(0)  # 14 target tokens in the first, 30 in the second
    both, metrics = step(init_state(train, sgd, 0), frozen, batch)
    halves = [jax.tree.map(lambda x, i=i: x[i : i + 1], batch) for i in (0, 1)]
    singles = [step(init_state(train, sgd, 0), frozen, half) for half in halves]
    counts = [float(m["tokens"]) for _, m in singles]
    assert counts == [14.0, 30.0] and float(metrics["tokens"]) == 44.0
    expected_loss = sum(float(m["loss"]) * n for (_, m), n in zip(singles, counts)) / 44
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-6)
    for path, x0 in jax.tree_util.tree_flatten_with_path(train)[0]:
        get = lambda tree, path=path, x0=x0: np.asarray(functools.reduce(lambda t, k: t[k.key], path, tree) - x0)  # noqa: E731
        expected = sum(get(s.trainable) * n for (s, _), n in zip(singles, counts)) / 44
        assert tiny.rel_err(get(both.trainable), expected) < 1e-5, jax.tree_util.keystr(path)


@TRAINS
def test_groups_have_their_own_learning_rates(checkpoint):
    _, model, params, adapters = _setup(checkpoint, tied=True)
    train, frozen = trainable.split({"params": params, **adapters})
    config = OptimConfig(lr=0.0, token_lr=1e-2, schedule="constant")
    optimizer = make_optimizer(config, trainable.labels(train))
    step = make_train_step(model, optimizer, schedule(config, config.lr), donate=False)
    state, _ = step(init_state(train, optimizer, 0), frozen, _batch())
    chex.assert_trees_all_equal(state.trainable["lora"], train["lora"])
    assert not np.array_equal(np.asarray(state.trainable["tokens"]["embed"]), np.asarray(train["tokens"]["embed"]))


def test_schedule_warms_up_then_decays():
    config = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, schedule="cosine", min_lr_ratio=0.1)
    lr = schedule(config, 1.0)
    assert [float(lr(s)) for s in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert float(lr(9)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert float(lr(14)) == pytest.approx(0.1)
    linear = schedule(OptimConfig(warmup_steps=0, total_steps=10, schedule="linear"), 2.0)
    assert float(linear(5)) == pytest.approx(1.0)


def test_lora_options_and_dropout(checkpoint):
    assert LoraConfig(rank=4, alpha=8).scaling == 2.0
    assert LoraConfig(rank=4, alpha=8, rslora=True).scaling == 4.0
    assert LoraConfig(targets="all-linear").targets == TARGETS
    assert LoraConfig(targets=["v_proj", "q_proj", "q_proj"]).targets == ("q_proj", "v_proj")
    for bad, message in (dict(rank=0), "rank"), (dict(targets=["qkv"]), "unknown LoRA target"), (
            dict(dropout=1.0), "dropout"):
        with pytest.raises(JaxtokError, match=message):
            LoraConfig(**bad)
    _, model, params, adapters = _setup(checkpoint, True, LoraConfig(rank=4, targets=("q_proj",), dropout=0.5))
    adapters["lora"] = jax.tree.map(lambda x: x + 0.1, adapters["lora"])
    variables, tokens = {"params": params, **adapters}, _batch()["tokens"][0]
    eval_logits, _ = model.apply(variables, tokens)
    no_dropout, _ = model.clone(lora=LoraConfig(rank=4, targets=("q_proj",))).apply(variables, tokens)
    np.testing.assert_array_equal(np.asarray(eval_logits), np.asarray(no_dropout))
    drop1, _ = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    drop2, _ = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(drop1, eval_logits) and not np.allclose(drop1, drop2)


def test_optimizer_state_only_for_trainable_leaves(checkpoint):
    _, model, params, adapters = _setup(checkpoint, tied=False)
    train, _ = trainable.split({"params": params, **adapters})
    state = make_optimizer(OptimConfig(), trainable.labels(train)).init(train)
    moments = [x for x in jax.tree.leaves(state) if x.dtype == jnp.float32]
    assert len(moments) == 2 * len(jax.tree.leaves(train))
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(train))
    assert isinstance(state, tuple) and isinstance(state[0], optax.ClipByGlobalNormState)
