"""jaxtok.generate decodes what transformers' `generate` decodes: greedy token for token, eos, and sampling filters.

Every `generate` call compiles once per (model, batch, prompt length, new tokens, sampling settings, eos); the tests
share a few such shapes so the file compiles eight programs in all (seven decoders, one forward pass), and
`stream` two more (its prefill and its step).
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from jaxtok.convert import load_pretrained
from jaxtok.generate import generate

NEW = 12  # new tokens per call
# Different lengths so the batch is left-padded; random ids (the model is random, any ids make a prompt).
_rng = np.random.default_rng(0)
PROMPTS = [_rng.integers(2, 320, size=n).tolist() for n in (7, 3, 5)]
PAD = 0


def _checkpoint(fixture, tied: bool):
    return fixture(tied=True) if tied else fixture()


@pytest.fixture(scope="module")
def models(checkpoint):
    """tied -> (jaxtok model, params), loaded once for the module."""
    loaded = {}

    def get(tied: bool):
        if tied not in loaded:
            loaded[tied] = load_pretrained(str(_checkpoint(checkpoint, tied)), dtype="float32")
        return loaded[tied]

    return get


@pytest.fixture(scope="module")
def hf_models(torch_checkpoint):
    """tied -> transformers' torch model of the same checkpoint."""
    return lambda tied: _checkpoint(torch_checkpoint, tied)[1]


def hf_greedy(hf, prompt, new=NEW, eos_id=None) -> list[int]:
    """transformers' greedy continuation of one prompt alone (no padding), without the prompt."""
    import tiny_torch  # the tests that call this have torch: they use `hf_models`

    return tiny_torch.hf_greedy(hf, prompt, new, eos_id, pad_id=PAD)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_single_prompt_matches_hf(models, hf_models, tied):
    model, params = models(tied)
    hf = hf_models(tied)
    ours = generate(model, {"params": params}, [PROMPTS[0]], NEW)
    expected = hf_greedy(hf, PROMPTS[0])
    assert len(expected) == NEW
    assert ours == [expected]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_left_padded_batch_matches_each_prompt_alone(models, hf_models, tied):
    model, params = models(tied)
    hf = hf_models(tied)
    ours = generate(model, {"params": params}, PROMPTS, NEW)
    assert len(ours) == len(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        assert ours[b] == hf_greedy(hf, prompt), f"row {b} (prompt length {len(prompt)})"


def _pick_eos(continuations: list[list[int]]) -> tuple[int, int, int]:
    """(row, step, token): the first token, at step >= 2 of some row, that this row has not emitted before."""
    for row, tokens in enumerate(continuations):
        for step in range(2, len(tokens) - 1):
            if tokens[step] not in tokens[:step]:
                return row, step, tokens[step]
    raise AssertionError(f"no usable eos candidate in {continuations}")


def test_eos_stops_each_row_like_hf(models, hf_models):
    model, params = models(False)
    hf = hf_models(False)
    plain = [hf_greedy(hf, p) for p in PROMPTS]
    row, step, eos = _pick_eos(plain)

    ours = generate(model, {"params": params}, PROMPTS, NEW, eos_id=eos)
    # The row that emits eos stops right after it, keeping eos; everything before is unchanged.
    assert ours[row] == plain[row][: step + 1]
    for b, prompt in enumerate(PROMPTS):
        with_eos = hf_greedy(hf, prompt, eos_id=eos)
        assert ours[b] == with_eos, f"row {b}"
        cut = plain[b][: plain[b].index(eos) + 1] if eos in plain[b] else plain[b]
        assert ours[b] == cut, f"row {b}: rows stop independently"


# Sampling: 16 copies of one prompt in one call give 16 independent samples per step.
SAMPLE_PROMPT = PROMPTS[0]
SAMPLE_ROWS = 16
TEMPERATURE, TOP_K, TOP_P = 0.7, 5, 0.8


@pytest.fixture(scope="module")
def sampled(models):
    model, params = models(False)

    def run(seed):
        return generate(
            model, {"params": params}, [SAMPLE_PROMPT] * SAMPLE_ROWS, NEW,
            temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, seed=seed,
        )

    return {"first": run(1), "again": run(1), "other": run(2)}


def test_sampling_reproducible_for_a_seed(sampled):
    assert sampled["first"] == sampled["again"]
    assert all(len(row) == NEW for row in sampled["first"])


def test_sampling_differs_across_seeds_and_rows(sampled):
    assert sampled["first"] != sampled["other"]
    # rows are independent samples, not copies of one
    assert len({tuple(row) for row in sampled["first"]}) > 1


def allowed_tokens(logits_V, tol=1e-4) -> set[int]:
    """Tokens that temperature + top-k + top-p sampling may emit from these logits (with a float tolerance)."""
    scaled = np.asarray(logits_V, np.float64) / TEMPERATURE
    order = np.argsort(-scaled)
    kth = scaled[order[TOP_K - 1]]
    in_top_k = [int(t) for t in order if scaled[t] >= kth - tol]
    # nucleus of the top-k-filtered distribution: a token stays while the mass before it is below top_p
    kept = scaled[in_top_k]
    probs = np.exp(kept - kept.max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    return {t for t, before in zip(in_top_k, mass_before) if before < TOP_P + tol}


def test_sampling_first_step_within_top_k_and_top_p(models, sampled):
    model, params = models(False)
    logits_V = tiny.jax_logits(model, params, np.asarray([SAMPLE_PROMPT], np.int32))[0, -1]
    allowed = allowed_tokens(logits_V)
    top_k_set = set(np.argsort(-logits_V)[:TOP_K].tolist())
    assert allowed <= top_k_set
    firsts = [row[0] for run in sampled.values() for row in run]
    assert set(firsts) <= allowed, f"first tokens {sorted(set(firsts))}, allowed {sorted(allowed)}"
    assert set(firsts) <= top_k_set


def test_sampling_every_step_within_top_k_and_top_p(hf_models, tiny_torch, sampled):
    hf = hf_models(False)
    for run in ("first", "other"):
        rows = np.asarray([SAMPLE_PROMPT + row for row in sampled[run]])
        logits_BTV = tiny_torch.hf_logits(hf, rows)
        P = len(SAMPLE_PROMPT)
        for b in range(SAMPLE_ROWS):
            for step in range(NEW):
                token = int(rows[b, P + step])
                assert token in allowed_tokens(logits_BTV[b, P + step - 1]), f"{run} row {b} step {step}"


def test_top_p_zero_keeps_only_the_most_likely_token(models, hf_models):
    model, params = models(False)
    hf = hf_models(False)
    out = generate(model, {"params": params}, [SAMPLE_PROMPT] * SAMPLE_ROWS, NEW, temperature=1.0, top_p=0.0, seed=0)
    assert out == [hf_greedy(hf, SAMPLE_PROMPT)] * SAMPLE_ROWS


def test_stream_equals_hf_and_compiles_once_for_prompts_of_one_bucket(models, hf_models):
    from jaxtok.generate import _stream_start, _stream_step, bucket, stream

    model, params = models(False)
    hf = hf_models(False)
    assert len({bucket(len(p)) for p in PROMPTS}) == 1
    compiled = _stream_start._cache_size(), _stream_step._cache_size()
    for prompt in PROMPTS:
        assert list(stream(model, {"params": params}, prompt, NEW)) == hf_greedy(hf, prompt)
    assert (_stream_start._cache_size(), _stream_step._cache_size()) == (compiled[0] + 1, compiled[1] + 1)
    # it stops after the first stop token, which it yields
    plain = hf_greedy(hf, PROMPTS[0])
    k = next(k for k in range(1, NEW) if plain[k] not in plain[:k])
    assert list(stream(model, {"params": params}, PROMPTS[0], NEW, stop_ids=(plain[k], 10**6))) == plain[: k + 1]
