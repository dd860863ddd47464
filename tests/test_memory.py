"""Memory of the compiled train step, from XLA's own analysis (exact figures, no timing).

A Llama-3-sized vocabulary (128,256) on a tiny body makes the vocabulary dominate, as it does for LoRA on Llama 3.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxtok import trainable
from jaxtok.llama_config import LlamaConfig
from jaxtok.lora import LoraConfig
from jaxtok.model import Llama
from jaxtok.optimizer import OptimConfig, make_optimizer, schedule
from jaxtok.step import init_state, make_train_step
from jaxtok.tokens import TokenRows

D, B, T = 64, 1, 64
LLAMA3_VOCAB = 128_256

pytestmark = pytest.mark.slow  # compiles train steps of a 128k vocabulary


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def compiled(vocab: int, k: int, tied: bool, full_embeddings: bool = False):
    """(XLA memory analysis of the train step, abstract state, abstract frozen tree) without allocating anything."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=D, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, tie_word_embeddings=tied)
    ids = tuple(range(10, 10 + k))
    model = Llama(config, lora=LoraConfig(rank=8, targets="all-linear"),
                  token_rows=TokenRows(ids, () if tied else ids))
    init = lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))  # noqa: E731
    method = "lora+full" if full_embeddings else "lora+rows"
    trainable_tree, frozen = trainable.split(dict(jax.eval_shape(init)), method)
    optimizer = make_optimizer(OptimConfig(), trainable.labels(trainable_tree, method))
    state = jax.eval_shape(lambda t: init_state(t, optimizer, 0), trainable_tree)
    batch = {name: jax.ShapeDtypeStruct((1, B, T), jnp.int32)
             for name in ("tokens", "positions", "segment_ids", "loss_mask")}
    step = make_train_step(model, optimizer, schedule(OptimConfig(), 1.0))
    return step.lower(state, frozen, batch).compile().memory_analysis(), state, frozen


def peak(vocab, k, tied, full_embeddings=False) -> int:
    """Bytes the step needs: its inputs, its scratch space and its outputs, donated buffers counted once."""
    m = compiled(vocab, k, tied, full_embeddings)[0]
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_token_rows_cost_about_what_lora_alone_costs(tied):
    lora_only, with_rows, full = (peak(LLAMA3_VOCAB, 0, tied), peak(LLAMA3_VOCAB, 4, tied),
                                  peak(LLAMA3_VOCAB, 0, tied, full_embeddings=True))
    assert lora_only < with_rows <= 1.01 * lora_only
    # training whole embedding (and untied head) matrices costs at least their gradient and two Adam moments
    matrices = 1 if tied else 2
    # (XLA may place one of those in the buffer the loss's logits chunk used, which is free by then)
    assert full - lora_only >= 3 * matrices * LLAMA3_VOCAB * D * 4 - B * T * LLAMA3_VOCAB * 4
    assert full - lora_only > 100 * (with_rows - lora_only)


def test_extra_memory_grows_with_k_not_with_vocabulary():
    shapes = ((32_000, 4), (LLAMA3_VOCAB, 4), (LLAMA3_VOCAB, 64))
    extra = {(v, k): peak(v, k, True) - peak(v, 0, True) for v, k in shapes}
    # the same k costs about the same whatever the vocabulary: the loss masks the rows' columns block by block, and
    # the blocks' sizes depend on the vocabulary, so a few [block] masks differ (tens of kB, against 33 MB per matrix)
    assert abs(extra[(32_000, 4)] - extra[(LLAMA3_VOCAB, 4)]) < LLAMA3_VOCAB * D * 4 // 100
    # and more rows cost more, by far less than one vocab x D matrix
    assert 0 < extra[(LLAMA3_VOCAB, 4)] < extra[(LLAMA3_VOCAB, 64)] < LLAMA3_VOCAB * D * 4 // 10


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_no_optimizer_state_or_output_for_frozen_parameters(tied):
    _, state, frozen = compiled(LLAMA3_VOCAB, 4, tied)
    float_state = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    # exactly two Adam moments per trainable leaf, of the trainable leaves' own size
    assert len(float_state) == 2 * len(jax.tree.leaves(state.trainable))
    assert _nbytes(float_state) == 2 * _nbytes(state.trainable)
    frozen_shapes = {x.shape for x in jax.tree.leaves(frozen)}
    assert not frozen_shapes & {x.shape for x in jax.tree.leaves(state)}
    # the step returns the new state only: nothing vocabulary-sized comes out of it
    m = compiled(LLAMA3_VOCAB, 4, tied)[0]
    assert m.output_size_in_bytes < LLAMA3_VOCAB * D * 4 // 10


# ------------------------------------------------------------------------------------------ the fused loss's memory

LONG_B, LONG_T = 2, 512  # enough positions that the logits dwarf everything else: 2 x 512 x 128,256 floats = 525 MB


def loss_and_grad_memory(fused: bool, vocab: int = LLAMA3_VOCAB):
    """XLA's memory analysis of the loss and its gradient (hidden states and token rows) over [LONG_B, LONG_T]."""
    from jaxtok.loss import Head, fused_next_token_loss, next_token_loss

    ids = (10, 11, 12, 13)

    def loss(x_BTD, delta_MD, weight_VD, tokens_BT, mask_BT):
        head = Head(weight_VD, "vd", ids, delta_MD)
        if fused:
            return fused_next_token_loss(head, x_BTD, tokens_BT, mask_BT)[0]
        return next_token_loss(head.logits(x_BTD), tokens_BT, mask_BT)[0]

    f32, i32 = jnp.float32, jnp.int32
    args = (jax.ShapeDtypeStruct((LONG_B, LONG_T, D), f32), jax.ShapeDtypeStruct((len(ids), D), f32),
            jax.ShapeDtypeStruct((vocab, D), f32), jax.ShapeDtypeStruct((LONG_B, LONG_T), i32),
            jax.ShapeDtypeStruct((LONG_B, LONG_T), i32))
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis()


def test_fused_loss_needs_an_eighth_of_the_full_logits_memory():
    full, fused = loss_and_grad_memory(False), loss_and_grad_memory(True)
    logits_bytes = LONG_B * LONG_T * LLAMA3_VOCAB * 4
    assert full.temp_size_in_bytes >= logits_bytes  # the reference holds at least the logits
    assert fused.temp_size_in_bytes <= full.temp_size_in_bytes / 8


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_train_step_has_no_batch_by_length_by_vocab_buffer(tied):
    config = LlamaConfig(vocab_size=LLAMA3_VOCAB, hidden_size=D, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, tie_word_embeddings=tied)
    ids = (10, 11, 12, 13)
    model = Llama(config, lora=LoraConfig(rank=8, targets="all-linear"), token_rows=TokenRows(ids, () if tied else ids))
    init = lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))  # noqa: E731
    trainable_tree, frozen = trainable.split(dict(jax.eval_shape(init)))
    optimizer = make_optimizer(OptimConfig(), trainable.labels(trainable_tree))
    state = jax.eval_shape(lambda t: init_state(t, optimizer, 0), trainable_tree)
    batch = {name: jax.ShapeDtypeStruct((1, LONG_B, LONG_T), jnp.int32)
             for name in ("tokens", "positions", "segment_ids", "loss_mask")}
    compiled = make_train_step(model, optimizer, schedule(OptimConfig(), 1.0)).lower(state, frozen, batch).compile()
    logits_bytes = LONG_B * LONG_T * LLAMA3_VOCAB * 4
    assert compiled.memory_analysis().temp_size_in_bytes < logits_bytes / 4
    hlo = compiled.as_text()
    assert f"[{LONG_B},{LONG_T},{LLAMA3_VOCAB}]" not in hlo
