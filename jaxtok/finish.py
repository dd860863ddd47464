"""What a finished run leaves behind: the PEFT adapter, the merged checkpoint, and the sample it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from jaxtok import chat as chat_lib
from jaxtok import tokens as tokens_lib
from jaxtok import trainable as trainable_lib
from jaxtok.export import export_merged, export_peft
from jaxtok.generate import generate
from jaxtok.model import Llama
from jaxtok.run_config import ExportSection, RunConfig, SampleSection
from jaxtok.setup import Setup, stop_id
from jaxtok.step import TrainState


def finish(config: RunConfig, setup: Setup, frozen: dict, state: TrainState, out: Path,
           log: Callable[[str], None]) -> None:
    """Exports (process 0 writes) and the sample (every process computes it: the model is sharded over them)."""
    variables = trainable_lib.merge(frozen, state.trainable)
    export(config.export, config.train.method, config.model.dtype, setup, variables, out, log)
    sample_after(config.sample, setup, variables, out, log)


def _host(tree):
    """The tree whole on every process: gathered across hosts when sharded over several (one process already
    addresses all of its devices)."""
    if jax.process_count() > 1:
        return jax.tree.map(jnp.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return tree


def export(e: ExportSection, method: str, dtype: str, setup: Setup, variables: dict, out: Path,
           log: Callable[[str], None]) -> None:
    """output_dir/adapter (PEFT's format) and output_dir/merged, as export.peft and export.merged ask."""
    is_main = jax.process_index() == 0
    full = trainable_lib.method(method).full
    # gathered once: the merged export needs the params, and lora+full's adapter its whole embedding and head
    host_params = _host(variables["params"]) if e.merged or (e.peft and full) else variables["params"]
    if e.peft:
        model, peft_adapters = peft_view(setup, variables, method)
        host = {"params": host_params, **_host(peft_adapters)}
        if is_main:
            write_adapter(out / "adapter", setup, host, method, overwrite=True, view=model)
            log(f"PEFT adapter: {out / 'adapter'}")
    if e.merged:
        host = {"params": host_params, **_host(trainable_lib.adapters_of(variables))}
        if is_main:
            write_merged(out / "merged", setup, host, e.merged_dtype or dtype, overwrite=True)
            log(f"merged checkpoint: {out / 'merged'}")


def write_adapter(target: str | Path, setup: Setup, variables: dict, method: str, overwrite: bool = False,
                  view: Optional[Llama] = None) -> None:
    """`variables` as a PEFT adapter: LoRA and token rows, and with lora+full the whole embedding and head.
    `view`: the model `peft_view` gave for these variables, when they are its adapters already."""
    if view is None:
        view, adapters = peft_view(setup, variables, method)
    else:
        adapters = trainable_lib.adapters_of(variables)
    full = variables["params"] if trainable_lib.method(method).full else None
    export_peft(target, view, adapters, setup.model_path, tokenizer=setup.tokenizer, added_ids=setup.added_ids,
                overwrite=overwrite, full_params=full)


def write_merged(target: str | Path, setup: Setup, variables: dict, dtype: str, overwrite: bool = False) -> None:
    """The base with `variables`' adapters folded in, as a Hugging Face checkpoint of `dtype`."""
    export_merged(target, setup.model, variables["params"], trainable_lib.adapters_of(variables),
                  tokenizer=setup.tokenizer, dtype=dtype, overwrite=overwrite)


def peft_view(setup: Setup, variables: dict, method: str) -> tuple[Llama, dict]:
    """The model and adapters to export in PEFT's format. A PEFT LoRA adapter can bring rows the base lacks only as
    trainable tokens (or whole matrices, lora+full's), so where the method left the rows of added tokens frozen
    (lora), their initial rows go in as token rows that did not train."""
    model, rows = setup.model, setup.model.token_rows
    full = trainable_lib.method(method).full
    missing = () if full else tuple(i for i in setup.added_ids if i not in rows.embed_ids)
    adapters = trainable_lib.adapters_of(variables)
    if not missing:
        return model, adapters
    tied = model.config.tie_word_embeddings
    index = jnp.asarray(missing)
    tables = {"embed": jnp.take(variables["params"]["embed"], index, axis=0).astype(jnp.float32)}
    if not tied:
        tables["head"] = jnp.take(variables["params"]["lm_head"], index, axis=1).T.astype(jnp.float32)
    return model.clone(token_rows=tokens_lib.TokenRows(missing, () if tied else missing)), {**adapters,
                                                                                                 "tokens": tables}


def sample_after(s: SampleSection, setup: Setup, variables: dict, out: Path, log: Callable[[str], None]) -> None:
    """sample.prompt's reply (through the calculator with sample.calculator) and the held-out score."""
    if s.max_new_tokens < 1:
        return
    if s.prompt and s.calculator:
        added = chat_lib.converse(_chat(setup, variables, s), [[{"role": "user", "content": s.prompt}]])[0]
        log(f"sample: {s.prompt!r} -> {chat_lib.show(added)}")
    elif s.prompt:
        text = sample(setup, variables, s.prompt, s.max_new_tokens, s.stop)
        log(f"sample: {s.prompt!r} -> {text!r}")
    if s.heldout:
        result = chat_lib.score(_chat(setup, variables, s), chat_lib.load_questions(s.heldout, s.heldout_rows),
                                s.calculator)
        if jax.process_index() == 0:
            chat_lib.write_score(out / "heldout.json", result)
        log(f"held-out questions: {result['right']}/{result['total']} right")
        if s.calculator:
            log(f"held-out calculator calls: {result['calls_right']}/{result['total']} right")


def _chat(setup: Setup, variables: dict, s: SampleSection) -> chat_lib.Chat:
    return chat_lib.Chat(setup.model, variables, setup.tokenizer, setup.chat_template, s.max_new_tokens,
                         stop_id(setup, s.stop))


def sample(setup: Setup, variables: dict, prompt: str, max_new_tokens: int, stop: str = "") -> str:
    """Greedy continuation of `prompt` (as a user turn for chat data), special tokens shown."""
    tokenizer = setup.tokenizer
    if setup.fmt == "messages":
        template = setup.chat_template or tokenizer.chat_template
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    out = generate(setup.model, variables, [list(ids)], max_new_tokens, eos_id=stop_id(setup, stop),
                   pad_id=tokenizer.pad_token_id or 0)[0]
    return tokenizer.decode(out, skip_special_tokens=False)
