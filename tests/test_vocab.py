"""Adding new special tokens, naming existing ones, and planning the token tables."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import tiny
from jaxtok import trainable
from jaxtok.convert import load_pretrained
from jaxtok.errors import JaxtokError
from jaxtok.tokenizer import load_tokenizer
from jaxtok.vocab import add_tokens, plan_rows, resolve_tokens

NEW = ("<|tool|>", "<|think|>")


@pytest.fixture
def setup(checkpoint, tmp_path):
    def get(tied):
        directory = checkpoint(tied=tied, vocab=300)  # the tokenizer fills the vocabulary: new rows must grow
        tiny.make_tokenizer(tmp_path)
        model, params = load_pretrained(str(directory))
        return model, params, load_tokenizer(str(tmp_path))

    return get


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_new_tokens_get_mean_rows_and_train_through_the_table(setup, tied):
    model, params, tokenizer = setup(tied)
    old_vocab = model.config.vocab_size
    assert len(tokenizer) == old_vocab
    grown, config, ids = add_tokens(tokenizer, params, model.config, NEW)
    assert ids == (old_vocab, old_vocab + 1) and config.vocab_size == old_vocab + 2 == len(tokenizer)
    # added as special tokens: never split, encoded as one id each
    assert tokenizer("a <|tool|> b", add_special_tokens=False)["input_ids"].count(ids[0]) == 1
    assert tokenizer.decode([ids[1]]) == NEW[1]
    embed = np.asarray(grown["embed"])
    np.testing.assert_array_equal(embed[:old_vocab], np.asarray(params["embed"]))
    np.testing.assert_allclose(embed[old_vocab:], np.broadcast_to(np.asarray(params["embed"]).mean(0), (2, 64)),
                               rtol=1e-5, atol=1e-7)
    if not tied:
        assert grown["lm_head"].shape == (64, old_vocab + 2)
        np.testing.assert_allclose(np.asarray(grown["lm_head"])[:, old_vocab], np.asarray(params["lm_head"]).mean(1),
                                   rtol=1e-5, atol=1e-7)
    rows = plan_rows(ids, (), tied)
    assert rows.embed_ids == ids and rows.head_ids == (() if tied else ids)
    grown_model = model.clone(config=config, token_rows=rows)
    adapters = trainable.init_adapters(grown_model, grown, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(adapters["tokens"]["embed"]), embed[list(ids)])
    logits, _ = grown_model.apply({"params": grown, **adapters}, np.asarray([[1, ids[0], ids[1]]]))
    assert logits.shape == (1, 3, old_vocab + 2)


def test_descriptions_initialise_rows_from_their_tokens(setup):
    model, params, tokenizer = setup(False)
    description = "the quick brown fox"
    description_ids = tokenizer(description, add_special_tokens=False)["input_ids"]
    grown, _, ids = add_tokens(tokenizer, params, model.config, NEW[:1], descriptions=[description])
    expected = np.asarray(params["embed"])[description_ids].mean(0)
    np.testing.assert_allclose(np.asarray(grown["embed"])[ids[0]], expected, rtol=1e-5, atol=1e-7)
    expected_head = np.asarray(params["lm_head"])[:, description_ids].mean(1)
    np.testing.assert_allclose(np.asarray(grown["lm_head"])[:, ids[0]], expected_head, rtol=1e-5, atol=1e-7)


def test_bad_new_tokens_are_named(setup):
    model, params, tokenizer = setup(True)
    for tokens, message in [((tiny.EOS,), "already in the vocabulary"), (("<a>", "<a>"), "listed twice"),
                            (("",), "non-empty")]:
        with pytest.raises(JaxtokError, match=message):
            add_tokens(tokenizer, params, model.config, tokens)
    with pytest.raises(JaxtokError, match="one per token"):
        add_tokens(tokenizer, params, model.config, ("<x>", "<y>"), descriptions=["only one"])


def test_existing_tokens_by_string_or_id(setup):
    model, _, tokenizer = setup(True)
    vocab = tokenizer.get_vocab()
    V = model.config.vocab_size
    assert resolve_tokens(tokenizer, [tiny.EOS, 12, "13"], V) == (vocab[tiny.EOS], 12, 13)
    for items, message in [(["<|nope|>"], "unknown token '<|nope|>'"), ([V], f"token id {V} is out of range"),
                           ([-1], "token id -1 is out of range"), ([tiny.EOS, vocab[tiny.EOS]], "listed twice")]:
        with pytest.raises(JaxtokError, match=message):
            resolve_tokens(tokenizer, items, V)


def test_plans():
    assert plan_rows((10, 11), (3,), tied=False).head_ids == (10, 11)
    assert plan_rows((10,), (3,), tied=False, head="all").head_ids == (10, 3)
    assert plan_rows((10,), (3,), tied=False, head="none").head_ids == ()
    with pytest.raises(JaxtokError, match="both added and listed"):
        plan_rows((3,), (3,), tied=True)
    with pytest.raises(JaxtokError, match="train_head"):
        plan_rows((3,), (), tied=False, head="some")
