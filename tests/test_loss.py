"""The fused chunked head + loss equals the loss on full logits, value and gradients, and never builds [B, T, V]."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtok.llama_config import LlamaConfig
from jaxtok.lora import LoraConfig
from jaxtok.loss import Head, auto_chunk, auto_vocab_block, fused_next_token_loss, next_token_loss
from jaxtok.model import Llama
from jaxtok.tokens import TokenRows
from jaxtok.trainable import adapters_of

B, T, D, V = 2, 12, 16, 50
IDS = (3, 7, 41)


def inputs(seed=0, padded=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    tokens = tokens.at[0, 4].set(IDS[1]).at[1, 9].set(IDS[0])  # some targets are token rows
    mask = np.ones((B, T), np.int32)
    if padded:
        mask[0, :3] = 0  # a prompt
        mask[1, 8:] = 0  # padding at the end
    return x, tokens, jnp.asarray(mask), rng


def heads(rng, layout, with_rows):
    weight = jnp.asarray(rng.normal(size=(V, D) if layout == "vd" else (D, V)) * 0.3, jnp.float32)
    if not with_rows:
        return Head(weight, layout)
    return Head(weight, layout, IDS, jnp.asarray(rng.normal(size=(len(IDS), D)) * 0.3, jnp.float32))


def reference(head, x, tokens, mask):
    return next_token_loss(head.logits(x), tokens, mask)


@pytest.mark.parametrize("layout", ["vd", "dv"], ids=["tied", "untied"])
@pytest.mark.parametrize("with_rows", [False, True], ids=["no-rows", "rows"])
@pytest.mark.parametrize("chunk", [1, 5, 12, 0])
def test_fused_loss_and_gradients_equal_the_full_logits(layout, with_rows, chunk):
    x, tokens, mask, rng = inputs()
    head = heads(rng, layout, with_rows)

    def loss(fn, x, weight, delta):
        total, count = fn(head._replace(weight=weight, delta_MD=delta), x)
        return total / count

    fused = lambda h, x: fused_next_token_loss(h, x, tokens, mask, chunk)  # noqa: E731
    full = lambda h, x: reference(h, x, tokens, mask)  # noqa: E731
    argnums = (1, 2, 3) if with_rows else (1, 2)
    got, got_grads = jax.value_and_grad(loss, argnums)(fused, x, head.weight, head.delta_MD)
    want, want_grads = jax.value_and_grad(loss, argnums)(full, x, head.weight, head.delta_MD)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-5, atol=1e-7)
    assert float(fused(head, x)[1]) == float(jnp.sum(mask[:, 1:]))


@pytest.mark.parametrize("layout", ["vd", "dv"], ids=["tied", "untied"])
@pytest.mark.parametrize("with_rows", [False, True], ids=["no-rows", "rows"])
@pytest.mark.parametrize("vocab_block", [1, 7, V, 0])
def test_frozen_head_takes_the_vocabulary_route_with_the_same_loss_and_gradients(layout, with_rows, vocab_block):
    """A head that is not differentiated (LoRA, token rows) is walked in blocks of vocabulary rows; 7 leaves a
    partial last block, and with rows some blocks hold masked columns."""
    x, tokens, mask, rng = inputs()
    head = heads(rng, layout, with_rows)

    def loss(fn, x, delta):
        total, count = fn(head._replace(delta_MD=delta), x)
        return total / count

    fused = lambda h, x: fused_next_token_loss(h, x, tokens, mask, vocab_block=vocab_block)  # noqa: E731
    full = lambda h, x: reference(h, x, tokens, mask)  # noqa: E731
    argnums = (1, 2) if with_rows else 1
    got, got_grads = jax.jit(jax.value_and_grad(loss, argnums), static_argnums=0)(fused, x, head.delta_MD)
    want, want_grads = jax.value_and_grad(loss, argnums)(full, x, head.delta_MD)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-5, atol=1e-7)


def test_the_route_is_chosen_by_whether_the_head_is_differentiated():
    x, tokens, mask, rng = inputs()
    head = heads(rng, "vd", with_rows=True)

    def program(argnums):
        def loss(x, weight, delta):
            h = head._replace(weight=weight, delta_MD=delta)
            return fused_next_token_loss(h, x, tokens, mask, chunk=4, vocab_block=7)[0]
        return jax.jit(jax.grad(loss, argnums)).lower(x, head.weight, head.delta_MD).as_text()

    for frozen in (program((0, 2)), program(2)):  # blocks of 7 vocabulary rows, never [B, C, V] logits
        assert f"tensor<{B}x{T}x7xf32>" in frozen and f"tensor<{B}x4x{V}xf32>" not in frozen
    trained = program((0, 1, 2))
    assert f"tensor<{B}x4x{V}xf32>" in trained and f"tensor<{B}x{T}x7xf32>" not in trained


@pytest.mark.parametrize("layout", ["vd", "dv"], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [1, 5, 0])
def test_fused_hits_count_the_argmax_targets_of_the_full_logits(layout, chunk):
    x, tokens, mask, rng = inputs()
    head = heads(rng, layout, with_rows=True)
    scored = np.asarray(mask) * np.isin(np.asarray(tokens), IDS)
    scored[:, 0] = 0
    # the first scored target becomes its position's argmax: x there points along the target's effective row
    (b, t), *_ = zip(*np.nonzero(scored))
    one_hot = jax.nn.one_hot(jnp.asarray([[int(tokens[b, t])]]), V)[None]  # [1, 1, 1, V]
    row_D = jax.grad(lambda z: jnp.sum(head.logits(z[None, None]) * one_hot))(jnp.zeros(D))
    x = x.at[b, t - 1].set(20 * row_D / jnp.linalg.norm(row_D))
    logits = np.asarray(head.logits(x))
    predicted = logits[:, :-1].argmax(-1)
    hits_want = int(((predicted == np.asarray(tokens)[:, 1:]) * scored[:, 1:]).sum())
    total, count, hits, n = fused_next_token_loss(head, x, tokens, mask, chunk, jnp.asarray(scored))
    want_total, want_count = reference(head, x, tokens, mask)
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
    assert float(count) == float(want_count) and float(n) == scored[:, 1:].sum()
    assert int(hits) == hits_want >= 1
    # every target scored: the hits are the plain next-token accuracy
    all_hits = fused_next_token_loss(head, x, tokens, mask, chunk, mask)[2]
    assert int(all_hits) == int(((predicted == np.asarray(tokens)[:, 1:]) * np.asarray(mask)[:, 1:]).sum())


def test_auto_chunk_keeps_the_logits_under_the_budget():
    assert auto_chunk(2, 512, 1000) == 512  # small logits: one chunk
    chunk = auto_chunk(4, 2048, 128_256, budget=64 * 2**20)
    assert 4 * chunk * 128_256 * 4 <= 64 * 2**20 < 4 * 2 * chunk * 128_256 * 4
    assert auto_chunk(64, 8, 10**9) == 1
    assert auto_chunk(2, 512, 128_256) == 32  # the CPU budget, 32 MiB


def test_auto_vocab_block_keeps_a_block_of_logits_under_the_budget():
    assert auto_vocab_block(1024, 1000) == 1000  # small logits: the whole vocabulary
    assert auto_vocab_block(1024, 128_256) == 1024  # the CPU budget, 4 MiB
    assert auto_vocab_block(10**6, 128_256) == 128  # the floor
    block = auto_vocab_block(3000, 128_256, budget=64 * 2**20)
    assert 3000 * block * 4 <= 64 * 2**20 < 3000 * 2 * block * 4


@pytest.mark.slow  # gradients through the whole model, both ways
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_loss_path_equals_logits_path_with_packing(tied):
    """Through the model: LoRA, token rows in the embedding and head, two packed documents and padding."""
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4, tie_word_embeddings=tied)
    model = Llama(config, lora=LoraConfig(rank=2, targets="all-linear"),
                  token_rows=TokenRows(IDS, () if tied else IDS[:2]), loss_chunk=5)
    _, tokens, mask, rng = inputs(1)
    segments = np.ones((B, T), np.int32)
    segments[0, 6:] = 2
    segments[1, 10:] = 0
    positions = np.where(segments[:, :] == 2, np.arange(T) - 6, np.arange(T))
    variables = model.init(jax.random.key(0), tokens)
    # non-trivial adapters: B of LoRA away from zero and rows away from their frozen copies
    variables = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape), variables)

    def loss(variables, fused):
        if fused:
            (total, count), _ = model.apply(variables, tokens, positions, segments, loss_mask_BT=mask)
        else:
            logits, _ = model.apply(variables, tokens, positions, segments)
            total, count = next_token_loss(logits, tokens, mask)
        return total / count

    got, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables, True)
    want, want_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables, False)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # gradients through the whole model, both ways
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_loss_and_gradients(remat):
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
    _, tokens, mask, _ = inputs(2)
    model = Llama(config, lora=LoraConfig(rank=2, targets="all-linear"), token_rows=TokenRows(IDS))
    variables = model.init(jax.random.key(0), tokens)
    variables = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape), variables)
    frozen, adapters = {"params": variables["params"]}, adapters_of(variables)

    def loss(adapters, model):
        (total, count), _ = model.apply({**frozen, **adapters}, tokens, loss_mask_BT=mask)
        return total / count

    want, want_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(adapters, model)
    got, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(adapters, model.clone(remat=remat))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-5, atol=1e-7)
