"""The training data pipeline: rows on disk -> token ids and loss masks -> fixed-length sequences -> batches.

Rows come in the formats TRL names, detected from the columns:

    text               {"text": "..."}                                  loss on every token
    prompt_completion  {"prompt": "...", "completion": "..."}           loss on the completion (and EOS)
    messages           {"messages": [{"role": ..., "content": ...}]}    loss on assistant turns only

Conversations are rendered with the tokenizer's chat template. Which tokens belong to assistant turns is found without
knowing anything about the template: the conversation is rendered up to each assistant message (with the generation
prompt) and up to and including it, which gives that message's span as character offsets in the full rendering; the
full rendering is then tokenized with offsets and tokens that touch a span are targets. The template's own end-of-turn
tokens fall inside the span, so the model learns to stop, as with TRL's `assistant_only_loss`.

Every example is truncated to the sequence length and either padded to its own row or packed with others into rows of
exactly that length. Packed documents get their own segment id (the model attends only within a segment) and
positions restarting at 0, and the first token of each document is never a target, so nothing in one document is
learned from another. Arrays are [E, T] int32: `tokens`, `positions`, `segment_ids` (0 = padding), `loss_mask`.

`Batches` then serves [A, B, T] batches (A micro-batches of B rows) as a pure function of (seed, step), so a run
resumed at step s sees exactly the batches it would have seen, without saving any iterator state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from jaxtok.errors import JaxtokError

if TYPE_CHECKING:
    import datasets

FORMATS = ("text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant", "tool")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SEQUENCE_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
PROGRESS_MIN_ROWS = 1000

# Llama-3 layout, for base models whose tokenizer has no template. The special tokens below must exist in the
# tokenizer as single (special) tokens, or they would be split into ordinary pieces; the training job adds them.
DEFAULT_CHAT_TEMPLATE_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first %}<|begin_of_text|>{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# ChatML, the layout of Qwen's chat models (Qwen2, Qwen2.5, Qwen3), as a template that only appends: without the
# default system prompt of Qwen2.5's template and the reasoning blocks that Qwen3's rewrites in earlier turns, either
# of which would keep assistant turns from being located.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Mistral's instruction layout (<s>[INST] user [/INST] reply</s>), as a template that only appends: every message but
# a reply is an instruction (Mistral's own template folds a system message into the last user turn instead).
MISTRAL_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first %}<s>{% endif %}"
    "{%- if message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}"
    "{%- else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{%- endfor %}"
)

Example = tuple[list[int], list[int]]  # (token ids, loss mask)


# ---------------------------------------------------------------------------------------------------------- loading


def load_rows(source: str, split: str = "train") -> "datasets.Dataset":
    """Rows from a local .jsonl/.json/.parquet/.csv file (all of it: `split` is for the other two), a local dataset
    directory (`load_dataset`'s or `save_to_disk`'s) or a dataset name (in the local cache when offline)."""
    path = Path(source).expanduser()
    looks_like_path = path.suffix.lower() in FILE_BUILDERS or source.startswith(("/", ".", "~"))
    if path.is_file() or (looks_like_path and not path.exists()):
        rows = _load_file(path)
    else:
        rows = _load_named(source, path, split)
    if len(rows) == 0:
        raise JaxtokError(f"data {source} has no rows; give a file or split with at least one row")
    return rows


def _load_file(path: Path) -> "datasets.Dataset":
    import datasets

    if not path.is_file():
        raise JaxtokError(f"data file {path} does not exist; check the path")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise JaxtokError(f"data file {path} has an unknown type; use a .jsonl, .json, .parquet or .csv file")
    # datasets fails on empty files in a different way for each builder (StopIteration for json); say it plainly.
    if path.stat().st_size == 0:
        raise JaxtokError(f"data file {path} is empty; it needs at least one row")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any failure to parse the user's file is a problem with the file
        message = _reason(e)
        if "corresponds to no data" in message:
            raise JaxtokError(f"data file {path} has no rows; it needs at least one row") from None
        raise JaxtokError(f"could not read data file {path}: {message}; check that it is valid {builder}") from None


def _load_named(source: str, path: Path, split: str) -> "datasets.Dataset":
    import datasets

    try:
        # A directory written by `save_to_disk` is not loadable by `load_dataset`.
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            rows = datasets.load_from_disk(str(path))
            return rows[split] if isinstance(rows, datasets.DatasetDict) else rows
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, missing split, ...: all fixed by the user
        raise JaxtokError(
            f"could not load dataset {source} (split {split}): {_reason(e)}; "
            "check the name and split (offline, only datasets in the local cache load), or give a local file"
        ) from None


def _reason(e: BaseException) -> str:
    """The first line of the most specific message: datasets wraps parser errors in a generic one."""
    import datasets

    while isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ is not None:
        e = e.__cause__
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------------------- formats


def detect_format(column_names: Sequence[str]) -> str:
    """"messages", "prompt_completion" or "text", from the columns present (in that order of preference)."""
    columns = set(column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise JaxtokError(
        f"cannot tell the data format from columns {sorted(columns)}; expected a column \"messages\", "
        "columns \"prompt\" and \"completion\", or a column \"text\""
    )


def check_format(column_names: Sequence[str], fmt: str) -> str:
    """Returns the format to use: `fmt`, or the detected one for "auto"; the columns it needs must be present."""
    if fmt == "auto":
        return detect_format(column_names)
    if fmt not in FORMATS:
        raise JaxtokError(f'unknown data format "{fmt}"; use auto, {", ".join(FORMATS)}')
    needed = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "messages": ["messages"]}[fmt]
    for column in needed:
        if column not in column_names:
            raise JaxtokError(
                f'data format "{fmt}" needs a column "{column}" but the columns are {sorted(column_names)}; '
                'rename the column or set the format to "auto"'
            )
    return fmt


# --------------------------------------------------------------------------------------------------------- encoding


def encode(row: dict, tokenizer, fmt: str, chat_template: Optional[str] = None) -> Example:
    """(token ids, loss mask) of one row; mask 1 marks a token the model must predict. mask[0] is always 0."""
    if fmt == "text":
        return _encode_text(_string(row, "text"), tokenizer)
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return _encode_prompt_completion(prompt, completion, tokenizer)
        if _is_list(prompt) and _is_list(completion):
            return _encode_conversation(
                _messages(prompt, "prompt"), _messages(completion, "completion"), tokenizer, chat_template
            )
        raise JaxtokError(
            f'"prompt" and "completion" must both be strings or both be lists of messages, '
            f"got {type(prompt).__name__} and {type(completion).__name__}"
        )
    if fmt == "messages":
        return _encode_messages(_messages(row.get("messages"), "messages"), tokenizer, chat_template)
    raise JaxtokError(f'unknown data format "{fmt}"; use {", ".join(FORMATS)}')


def _encode_text(text: str, tokenizer) -> Example:
    ids = list(tokenizer(text)["input_ids"]) + _eos(tokenizer)
    return ids, _no_first([1] * len(ids))


def _encode_prompt_completion(prompt: str, completion: str, tokenizer) -> Example:
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + _eos(tokenizer)
    return prompt_ids + completion_ids, _no_first([0] * len(prompt_ids) + [1] * len(completion_ids))


def _encode_conversation(prompt: list, completion: list, tokenizer, chat_template: Optional[str]) -> Example:
    """TRL's conversational prompt-completion: the whole rendered continuation of the prompt is the target."""
    template = _template(tokenizer, chat_template)
    prompt_text = _render(tokenizer, prompt, template, add_generation_prompt=True)
    full = _render(tokenizer, prompt + completion, template)
    _check_prefix(prompt_text, full)
    return _tokenize_spans(full, [(len(prompt_text), len(full))], tokenizer)


def _encode_messages(messages: list, tokenizer, chat_template: Optional[str]) -> Example:
    template = _template(tokenizer, chat_template)
    full = _render(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # A reply that opens the conversation has no prefix to render (templates may not accept an empty list).
        before = _render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], template)
        _check_prefix(before, through)
        _check_prefix(through, full)
        spans.append((len(before), len(through)))
    return _tokenize_spans(full, spans, tokenizer)


def _tokenize_spans(text: str, spans: list[tuple[int, int]], tokenizer) -> Example:
    """Tokens of `text` (which holds its own BOS, if any) with mask 1 on tokens that overlap a character span."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise JaxtokError(
            "conversations need a fast tokenizer (one with offsets); save the tokenizer as tokenizer.json"
        ) from None
    ids = list(encoding["input_ids"])
    mask = [0] * len(ids)
    for k, (start, end) in enumerate(encoding["offset_mapping"]):
        # Overlap, not containment: a token merging template text with the reply still has to be predicted.
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            mask[k] = 1
    return ids, _no_first(mask)


def _template(tokenizer, chat_template: Optional[str]) -> Optional[str]:
    """The template to pass to `apply_chat_template`: None means the tokenizer's own."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise JaxtokError(
            "the tokenizer has no chat template; set data.chat_template (jaxtok.data.DEFAULT_CHAT_TEMPLATE suits "
            "base Llama models)"
        )
    return chat_template


def _render(tokenizer, messages: list, template: Optional[str], add_generation_prompt: bool = False) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except jinja2.TemplateError as e:
        raise JaxtokError(f"the chat template rejected the conversation: {_first_line(e)}") from None


def render_chat(tokenizer, messages: list, chat_template: Optional[str] = None,
                add_generation_prompt: bool = False) -> str:
    """`messages` rendered as the training data are (with `chat_template`, or the tokenizer's own when None)."""
    return _render(tokenizer, messages, _template(tokenizer, chat_template), add_generation_prompt)


def read_messages(value, column: str = "messages") -> list[dict]:
    """A row's list of {"role", "content"} messages, checked as the training data are."""
    return _messages(value, column)


def _check_prefix(prefix: str, text: str) -> None:
    if not text.startswith(prefix):
        raise JaxtokError(
            "the chat template renders a conversation differently from its beginning, so assistant turns cannot be "
            "located; use a template that only appends (set data.chat_template)"
        )


def _messages(value, column: str) -> list[dict]:
    if not _is_list(value) or not value:
        raise JaxtokError(f'"{column}" must be a non-empty list of {{"role": ..., "content": ...}} dicts')
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise JaxtokError(f'message {k} of "{column}" is a {type(message).__name__}, not a dict')
        # Arrow gives every message every key seen in the file, absent ones as None; templates test keys by presence.
        message = {key: v for key, v in message.items() if v is not None}
        role = message.get("role")
        if role not in ROLES:
            raise JaxtokError(f'message {k} of "{column}" has role {role!r}; use one of {", ".join(ROLES)}')
        if not isinstance(message.get("content"), str):
            raise JaxtokError(f'message {k} of "{column}" has no string "content"')
        messages.append(message)
    return messages


def _string(row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise JaxtokError(f'column "{column}" must hold a string, got {type(value).__name__}')
    return value


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple))


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _no_first(mask: list[int]) -> list[int]:
    # Nothing predicts the first token; zero it so target counts mean what they say.
    return [0] + mask[1:] if mask else mask


# -------------------------------------------------------------------------------------------------------- sequences


def build_sequences(examples: Sequence[Example], seq_len: int, packing: bool) -> dict[str, np.ndarray]:
    """[E, seq_len] int32 arrays `tokens`, `positions`, `segment_ids` (0 = padding) and `loss_mask`.

    Examples are truncated to `seq_len`; those left with fewer than 2 tokens are dropped. Without packing each
    example gets a row; with packing examples are appended to the current row while they fit, in order.
    """
    if seq_len < 2:
        raise JaxtokError(f"the sequence length is {seq_len}; it must be at least 2")
    kept = [(ids[:seq_len], mask[:seq_len]) for ids, mask in examples if min(len(ids), seq_len) >= 2]
    rows = _pack(kept, seq_len) if packing else [[example] for example in kept]
    arrays = {key: np.zeros((len(rows), seq_len), np.int32) for key in SEQUENCE_KEYS}
    for r, documents in enumerate(rows):
        t = 0
        for segment, (ids, mask) in enumerate(documents, start=1):
            n = len(ids)
            arrays["tokens"][r, t : t + n] = ids
            arrays["positions"][r, t : t + n] = np.arange(n)
            arrays["segment_ids"][r, t : t + n] = segment
            arrays["loss_mask"][r, t : t + n] = mask
            # The previous token belongs to another document (or nothing): never a target.
            arrays["loss_mask"][r, t] = 0
            t += n
    return arrays


def _pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for example in examples:
        if current and used + len(example[0]) > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(example)
        used += len(example[0])
    if current:
        rows.append(current)
    return rows


# ---------------------------------------------------------------------------------------------------------- batches


class Batches:
    """Batches of A micro-batches of B rows as a pure function of (seed, step).

    Global row g = step*A*B + k is row `perm_e[g % E]` with e = g // E and perm_e a permutation drawn from
    `np.random.default_rng((seed, e))`: every epoch sees every row once, and a batch straddling an epoch boundary
    takes the end of one order and the start of the next. Any process can read any rows of a step's batch (`batch`
    with `rows`); `jaxtok.sharding.global_batch` has each read only the rows its own devices hold.
    """

    def __init__(self, sequences: dict[str, np.ndarray], batch_size: int, micro_batches: int = 1, seed: int = 0):
        if batch_size < 1 or micro_batches < 1:
            raise JaxtokError(f"batch size {batch_size} and micro-batches {micro_batches} must be at least 1")
        if seed < 0:
            raise JaxtokError(f"seed {seed} must be non-negative")
        shapes = {key: np.shape(sequences[key]) for key in SEQUENCE_KEYS}
        if len(set(shapes.values())) != 1 or len(shapes["tokens"]) != 2 or shapes["tokens"][0] == 0:
            raise ValueError(f"sequences must be non-empty [E, T] arrays of one shape, got {shapes}")
        self._sequences = {key: np.asarray(sequences[key], np.int32) for key in SEQUENCE_KEYS}
        self.batch_size, self.micro_batches, self.seed = batch_size, micro_batches, seed
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_rows(self) -> int:
        return self._sequences["tokens"].shape[0]

    @property
    def rows_per_step(self) -> int:
        """Rows of the global batch, over all processes and micro-batches."""
        return self.micro_batches * self.batch_size

    def epoch_of(self, step: int) -> int:
        """The epoch the first row of `step` belongs to."""
        return step * self.rows_per_step // self.num_rows

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """The [A, B, T] shape of each array of a step's whole (global) batch, by key."""
        shape = (self.micro_batches, self.batch_size, self._sequences["tokens"].shape[1])
        return {key: shape for key in self._sequences}

    def batch(self, step: int, rows: Optional[slice] = None) -> dict[str, np.ndarray]:
        """The batch of `step`: [A, B, T] int32 arrays, or, given `rows` (a slice of the B axis, as a device's shard
        asks for it), just those rows of every micro-batch."""
        if step < 0:
            raise ValueError(f"step {step} is negative")
        A, B = self.micro_batches, self.batch_size
        global_AB = step * A * B + np.arange(A * B, dtype=np.int64).reshape(A, B)
        mine_AB = global_AB if rows is None else global_AB[:, rows]
        indices = self._rows(mine_AB.reshape(-1))
        T = self._sequences["tokens"].shape[1]
        return {key: array[indices].reshape(mine_AB.shape + (T,)) for key, array in self._sequences.items()}

    def _rows(self, global_indices: np.ndarray) -> np.ndarray:
        E = self.num_rows
        epochs, offsets = global_indices // E, global_indices % E
        rows = np.empty_like(global_indices)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            rows[where] = self._order(int(epoch))[offsets[where]]
        return rows

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            # Consecutive steps reuse one or two epochs' orders; older ones are not needed again in a normal run.
            if len(self._orders) >= 4:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_rows)
        return self._orders[epoch]


# ---------------------------------------------------------------------------------------------------------- prepare


def prepare(
    source: str,
    tokenizer,
    fmt: str,
    seq_len: int,
    packing: bool,
    chat_template: Optional[str] = None,
    max_rows: Optional[int] = None,
    split: str = "train",
) -> tuple[dict[str, np.ndarray], dict]:
    """Loads, encodes and packs `source`; returns the [E, seq_len] sequences and a summary for the log."""
    from tqdm.auto import tqdm

    if max_rows is not None and max_rows < 1:
        raise JaxtokError(f"max_rows is {max_rows}; it must be at least 1 (or unset for all rows)")
    rows = load_rows(source, split)
    if max_rows is not None and max_rows < len(rows):
        rows = rows.select(range(max_rows))
    try:
        fmt = check_format(rows.column_names, fmt)
    except JaxtokError as e:
        raise JaxtokError(f"data {source}: {e}") from None
    if fmt == "messages":
        _template(tokenizer, chat_template)  # fail before the first row, not on it

    examples = []
    progress = tqdm(rows, total=len(rows), desc="tokenizing", unit="row", disable=len(rows) <= PROGRESS_MIN_ROWS)
    for i, row in enumerate(progress):
        try:
            examples.append(encode(row, tokenizer, fmt, chat_template))
        except JaxtokError as e:
            raise JaxtokError(f"row {i} of {source}: {e}") from None

    sequences = build_sequences(examples, seq_len, packing)
    if len(sequences["tokens"]) == 0:
        raise JaxtokError(f"no row of {source} has two or more tokens; check the data and its format ({fmt})")
    target_tokens = int(sequences["loss_mask"].sum())
    if target_tokens == 0:
        raise JaxtokError(f"no row of {source} has a token to learn (e.g. no assistant message); check the data")
    info = {
        "format": fmt,
        "rows": len(rows),
        "sequences": len(sequences["tokens"]),
        "tokens": int((sequences["segment_ids"] > 0).sum()),
        "target_tokens": target_tokens,
        "dropped": sum(1 for ids, _ in examples if min(len(ids), seq_len) < 2),
        "truncated": sum(1 for ids, _ in examples if len(ids) > seq_len),
    }
    return sequences, info
