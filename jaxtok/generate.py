"""Greedy and sampled decoding with a KV cache, compiled once per (batch, prompt length, new tokens) shape.

Prompts are left-padded, as transformers does for decoder-only models: padding gets segment id 0 (never attended)
and real tokens positions 0, 1, ... counted from their own first token, so a batch decodes exactly as each prompt
would alone. After a row emits `eos_id` it emits `pad_id` only.

`stream` decodes one prompt a token at a time, for a terminal to show text as it comes: the same prefill and step,
each compiled once per bucket of prompt lengths rather than once per length.
"""

from __future__ import annotations

import functools
from typing import Collection, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok.errors import JaxtokError
from jaxtok.model import Llama, init_cache


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, positions and segment ids [B, P] for left-padded prompts."""
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    segments = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        if len(p):
            tokens[b, P - len(p) :] = p
            segments[b, P - len(p) :] = 1
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, segments


def _choose(logits_BV, rng, temperature: float, top_k: int, top_p: float):
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # keep the smallest set whose mass reaches top_p: a token stays if the mass before it is below top_p
        mass_before_BV = cumulative_BV - jax.nn.softmax(sorted_BV, axis=-1)
        cutoff_index_B = jnp.maximum(jnp.sum(mass_before_BV < top_p, axis=-1) - 1, 0)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_index_B[:, None], axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def _prefill(model, variables, tokens_BP, positions_BP, segments_BP, cache_len: int):
    """(logits [B, V] of the last prompt position, the cache of `cache_len` slots holding the prompt)."""
    B, _ = tokens_BP.shape
    cache = init_cache(model.config, B, cache_len, model.dtype)
    logits_B1V, cache = model.apply(variables, tokens_BP, positions_BP, segments_BP, cache=cache, last_only=True)
    return logits_B1V[:, 0], cache


def _extend(model, variables, token_B, position_B, cache):
    """(logits [B, V] after one more token per row, the cache holding it)."""
    segments_B1 = jnp.ones((token_B.shape[0], 1), jnp.int32)
    logits_B1V, cache = model.apply(variables, token_B[:, None], position_B[:, None], segments_B1, cache=cache)
    return logits_B1V[:, 0], cache


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id")
)
def _decode(model, variables, tokens_BP, positions_BP, segments_BP, rng, *, max_new_tokens, temperature, top_k, top_p,
            eos_id, pad_id):
    B, P = tokens_BP.shape
    choose = functools.partial(_choose, temperature=temperature, top_k=top_k, top_p=top_p)
    logits_BV, cache = _prefill(model, variables, tokens_BP, positions_BP, segments_BP, P + max_new_tokens)
    rng, step_rng = jax.random.split(rng)
    first_B = choose(logits_BV, step_rng)
    done_B = first_B == eos_id if eos_id is not None else jnp.zeros((B,), bool)

    def step(carry, _):
        token_B, position_B, done_B, cache, rng = carry
        logits_BV, cache = _extend(model, variables, token_B, position_B, cache)
        rng, step_rng = jax.random.split(rng)
        next_B = jnp.where(done_B, pad_id, choose(logits_BV, step_rng))
        if eos_id is not None:
            done_B = done_B | (next_B == eos_id)
        return (next_B, position_B + 1, done_B, cache, rng), next_B

    carry = (first_B, positions_BP[:, -1] + 1, done_B, cache, rng)
    _, rest_GB = jax.lax.scan(step, carry, None, length=max_new_tokens - 1)
    return jnp.concatenate([first_B[:, None], rest_GB.T], axis=1)


def generate(
    model: Llama,
    variables: dict,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    seed: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (without the prompt), cut after `eos_id`. temperature 0 is greedy decoding."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, positions, segments = left_pad(prompts, pad_id)
    out = _decode(
        model, variables, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments), jax.random.key(seed),
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
        eos_id=eos_id, pad_id=pad_id,
    )
    results = []
    for row in np.asarray(out).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        results.append(row)
    return results


SAMPLING = ("temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=("model", "cache_len") + SAMPLING)
def _stream_start(model, variables, tokens_1P, positions_1P, segments_1P, rng, *, cache_len, temperature, top_k,
                  top_p):
    logits_1V, cache = _prefill(model, variables, tokens_1P, positions_1P, segments_1P, cache_len)
    rng, step_rng = jax.random.split(rng)
    return _choose(logits_1V, step_rng, temperature, top_k, top_p), cache, rng


@functools.partial(jax.jit, static_argnames=("model",) + SAMPLING, donate_argnames=("cache",))
def _stream_step(model, variables, token_1, position_1, cache, rng, *, temperature, top_k, top_p):
    logits_1V, cache = _extend(model, variables, token_1, position_1, cache)
    rng, step_rng = jax.random.split(rng)
    return _choose(logits_1V, step_rng, temperature, top_k, top_p), cache, rng


def bucket(length: int, smallest: int = 64) -> int:
    """The padded length of a prompt of `length` tokens: the next power of two from `smallest`, so a conversation
    that grows compiles again only when it doubles."""
    return max(smallest, 1 << max(0, length - 1).bit_length())


def stream(
    model: Llama,
    variables: dict,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Collection[int] = (),
    pad_id: int = 0,
    seed: int = 0,
) -> Iterator[int]:
    """The new tokens of one prompt, yielded one at a time as they are chosen, up to and including the first of
    `stop_ids`, at most `max_new_tokens` and never past the model's context (`max_position_embeddings`).

    The prompt is left-padded to `bucket(len(prompt))` and the cache holds that plus `max_new_tokens` slots: a prompt
    in the same bucket reuses the compiled programs. Greedy output equals `generate`'s for the same prompt.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    context = model.config.max_position_embeddings
    if len(prompt) >= context:
        raise JaxtokError(f"the prompt is {len(prompt)} tokens, but the model's context is {context} "
                          "(max_position_embeddings); shorten it")
    if not prompt:
        raise JaxtokError("the prompt is empty: it has no tokens to continue")
    tokens, positions, segments = left_pad([prompt], pad_id)
    padding = bucket(len(prompt)) - len(prompt)
    pad = lambda a, value: np.pad(a, ((0, 0), (padding, 0)), constant_values=value)  # noqa: E731
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    token_1, cache, rng = _stream_start(
        model, variables, jnp.asarray(pad(tokens, pad_id)), jnp.asarray(pad(positions, 0)),
        jnp.asarray(pad(segments, 0)), jax.random.key(seed), cache_len=padding + len(prompt) + max_new_tokens,
        **sampling,
    )
    stops = {int(i) for i in stop_ids}
    for n in range(min(max_new_tokens, context - len(prompt))):
        if n:
            position_1 = jnp.full((1,), len(prompt) + n - 1, jnp.int32)
            token_1, cache, rng = _stream_step(model, variables, token_1, position_1, cache, rng, **sampling)
        token = int(token_1[0])
        yield token
        if token in stops:
            return


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if not 0.0 <= top_p <= 1.0 or temperature < 0 or top_k < 0 or max_new_tokens < 1:
        raise JaxtokError(
            f"sampling needs 0 <= top_p <= 1, temperature >= 0, top_k >= 0 and max_new_tokens >= 1 (got top_p={top_p},"
            f" temperature={temperature}, top_k={top_k}, max_new_tokens={max_new_tokens})"
        )
