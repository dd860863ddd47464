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
    trainable_tree, frozen = trainable.split(dict(jax.eval_shape(init)), full_embeddings)
    optimizer = make_optimizer(OptimConfig(), trainable.labels(trainable_tree, full_embeddings))
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
    assert full - lora_only >= 3 * matrices * LLAMA3_VOCAB * D * 4
    assert full - lora_only > 100 * (with_rows - lora_only)


def test_extra_memory_grows_with_k_not_with_vocabulary():
    extra = {(v, k): peak(v, k, True) - peak(v, 0, True) for v, k in ((32_000, 4), (LLAMA3_VOCAB, 4), (LLAMA3_VOCAB, 64))}
    # the same k costs the same whatever the vocabulary
    assert extra[(32_000, 4)] == extra[(LLAMA3_VOCAB, 4)]
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
