"""Talking to a model from a terminal (`scripts/generate.py`): loading what the user names, and showing the
continuation as it is generated.

Three things can be talked to: a Hugging Face checkpoint (a run's `merged/` export, or any base), a base with a PEFT
adapter (from jaxtok or from PyTorch, with its own tokenizer when it added tokens), or the latest checkpoint of a
run's output_dir, rebuilt as `scripts/export.py` rebuilds it. Generation stops at the tokenizer's EOS, the ids
`generation_config.json` lists as EOS, and the chat template's end-of-turn token.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from jaxtok import trainable
from jaxtok.data import render_chat
from jaxtok.errors import JaxtokError
from jaxtok.generate import stream
from jaxtok.hf_io import read_json, resolve_model_dir
from jaxtok.model import Llama


@dataclasses.dataclass
class Talker:
    """A model ready to generate, with its tokenizer, chat template and stop tokens."""

    model: Llama
    variables: dict
    tokenizer: Any
    chat_template: Optional[str]  # None: the tokenizer has none and none was given
    stop_ids: tuple[int, ...]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation rendered for the assistant's next turn and tokenized as the training data are (the
        template writes BOS)."""
        self.require_template()
        text = render_chat(self.tokenizer, messages, self.chat_template, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def require_template(self) -> None:
        if self.chat_template is None:
            raise JaxtokError("the tokenizer has no chat template; pass --chat-template FILE (a Jinja template)")

    def text_prompt(self, text: str) -> list[int]:
        """Plain text, with the tokenizer's default special tokens (a BOS where it adds one)."""
        return self.tokenizer(text)["input_ids"]

    def say(self, prompt: Sequence[int], write: Callable[[str], object], max_new_tokens: int,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> tuple[list[int], str]:
        """(new token ids, their text without the final stop token). The text goes to `write` as it grows: the
        continuation so far is decoded whole and its new end written, held back while it ends in an incomplete
        UTF-8 character."""
        ids: list[int] = []
        shown = ""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for token in stream(self.model, self.variables, prompt, max_new_tokens, temperature=temperature,
                            top_p=top_p, stop_ids=self.stop_ids, pad_id=pad_id, seed=seed):
            ids.append(token)
            text = self.decode(ids)
            if text.startswith(shown) and not text.endswith("\ufffd"):
                write(text[len(shown):])
                shown = text
        text = self.decode(ids)
        if text.startswith(shown):
            write(text[len(shown):])
        return ids, text

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without a final stop token, special tokens shown."""
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load(model_path: Optional[str], adapter: Optional[str] = None, run: Optional[str] = None,
         dtype: str = "float32", chat_template: Optional[str] = None) -> Talker:
    """The model `scripts/generate.py` names: `model_path` alone, with a PEFT `adapter`, or a `run`'s latest
    checkpoint (on `model_path` when given, else on the base its config names). `chat_template` (the text of a
    template) replaces the tokenizer's own."""
    from jaxtok.convert import load_pretrained
    from jaxtok.demo import resolve_model_path
    from jaxtok.peft_import import apply_adapter
    from jaxtok.tokenizer import load_tokenizer

    if run:
        from jaxtok.setup import load_run

        config, setup, frozen, state = load_run(run, model_path=model_path, dtype=dtype)
        model, tokenizer, base_path = setup.model, setup.tokenizer, setup.model_path
        variables = trainable.merge(frozen, state.trainable)
    else:
        if not model_path:
            raise JaxtokError("name a model: --model DIR_OR_HUB_ID, or --run OUTPUT_DIR")
        base_path = resolve_model_path(model_path)
        model, params = load_pretrained(base_path, dtype=dtype)
        tokenizer = load_tokenizer(base_path)
        adapters: dict = {}
        if adapter:
            model, params, adapters, tokenizer = apply_adapter(adapter, model, params, tokenizer)
        variables = {"params": params, **adapters}
    template = chat_template or getattr(tokenizer, "chat_template", None) or None
    stops = [tokenizer.eos_token_id, *_generation_eos(base_path)]
    if template is not None:
        stops.append(end_of_turn_id(tokenizer, template))
    return Talker(model, variables, tokenizer, template, tuple(dict.fromkeys(i for i in stops if i is not None)))


def read_template(path: str) -> str:
    """The text of a chat template file."""
    file = Path(path)
    if not file.is_file():
        raise JaxtokError(f"chat template file {file} does not exist; pass a Jinja template file")
    return file.read_text(encoding="utf-8")


def end_of_turn_id(tokenizer, chat_template: str) -> Optional[int]:
    """The token the template writes right after an assistant message (`<|eot_id|>`, `<|im_end|>`, ...) when it is
    one special or added token; None otherwise."""
    marker = "jaxtok-end-of-turn-marker"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = render_chat(tokenizer, messages, chat_template)
    except JaxtokError:
        return None
    if marker not in text:
        return None
    ids = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


def _generation_eos(model_path: str) -> list[int]:
    """The EOS ids of the checkpoint's generation_config.json (one or a list; Llama 3 instruct lists three)."""
    path = resolve_model_dir(model_path) / "generation_config.json"
    if not path.is_file():
        return []
    eos = read_json(path, "model").get("eos_token_id")
    return [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
