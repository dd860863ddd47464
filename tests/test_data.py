"""The data pipeline: loading files, the three row formats and their loss masks, packing, and resumable batches."""

from __future__ import annotations

import json

import datasets
import huggingface_hub
import jax
import numpy as np
import pandas as pd
import pytest

import tiny
from jaxtok import data
from jaxtok.errors import JaxtokError
from jaxtok.sharding import batch_sharding, global_batch

EOT = "<|eot_id|>"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "It is 42."},
    {"role": "user", "content": "And the café in Spain?"},
    {"role": "assistant", "content": "The rain stays mainly in the plain, café or not."},
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keeps the Arrow files datasets writes for each loaded file out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture
def tokenizer(tmp_path):
    return tiny.make_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def chat_tokenizer(tmp_path):
    tok = tiny.make_tokenizer(tmp_path / "chat_tokenizer")
    tok.add_tokens(list(data.DEFAULT_CHAT_TEMPLATE_TOKENS), special_tokens=True)
    tok.chat_template = data.DEFAULT_CHAT_TEMPLATE
    return tok


def write(path, rows, kind=None):
    """Writes `rows` (a list of dicts) as .jsonl, .json, .parquet or .csv, chosen by the suffix."""
    kind = kind or path.suffix
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == ".json":
        path.write_text(json.dumps(rows))
    elif kind == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif kind == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def masked_text(tokenizer, ids, mask, value=1) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m == value])


# ---------------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_text_rows_load_from_every_file_type(tmp_path, tokenizer, suffix):
    source = write(tmp_path / f"rows{suffix}", [{"text": t, "id": k} for k, t in enumerate(tiny.CORPUS[:5])])
    rows = data.load_rows(source)
    assert rows["text"] == tiny.CORPUS[:5]
    sequences, info = data.prepare(source, tokenizer, "auto", seq_len=64, packing=False)
    assert info["format"] == "text" and info["rows"] == 5 and info["sequences"] == 5
    assert sequences["tokens"][0, 0] == tokenizer.bos_token_id


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_prompt_completion_rows_load_and_are_detected(tmp_path, tokenizer, suffix):
    rows = [{"prompt": "Question: what is 12 plus 30?", "completion": " Answer: 42."}] * 3
    _, info = data.prepare(write(tmp_path / f"pc{suffix}", rows), tokenizer, "auto", seq_len=128, packing=True)
    assert info["format"] == "prompt_completion" and info["rows"] == 3 and info["sequences"] == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_messages_rows_load_and_are_detected(tmp_path, chat_tokenizer, suffix):
    source = write(tmp_path / f"chat{suffix}", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    sequences, info = data.prepare(source, chat_tokenizer, "auto", seq_len=128, packing=False)
    assert info["format"] == "messages" and info["sequences"] == 2
    ids, mask = data.encode({"messages": CONVERSATION}, chat_tokenizer, "messages")
    np.testing.assert_array_equal(sequences["tokens"][0, : len(ids)], ids)
    np.testing.assert_array_equal(sequences["loss_mask"][0, : len(ids)], mask)


def test_messages_with_uneven_keys_load(tmp_path, chat_tokenizer):
    # Arrow gives the first message a "name": None; the template must not see it.
    conversation = [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello"}]
    _, info = data.prepare(write(tmp_path / "c.jsonl", [{"messages": conversation}]), chat_tokenizer, "auto", 64, False)
    assert info["target_tokens"] > 0


def test_local_dataset_directories_load(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    write(directory / "train.jsonl", [{"text": "a b"}, {"text": "c d"}])
    assert len(data.load_rows(str(directory))) == 2
    data.load_rows(str(directory)).save_to_disk(tmp_path / "saved")
    assert data.load_rows(str(tmp_path / "saved"))["text"] == ["a b", "c d"]


def test_max_rows_keeps_the_first_rows(tmp_path, tokenizer):
    source = write(tmp_path / "rows.jsonl", [{"text": t} for t in tiny.CORPUS])
    sequences, info = data.prepare(source, tokenizer, "text", seq_len=64, packing=False, max_rows=3)
    assert info["rows"] == 3 and info["sequences"] == 3
    ids, _ = data.encode({"text": tiny.CORPUS[2]}, tokenizer, "text")
    np.testing.assert_array_equal(sequences["tokens"][2, : len(ids)], ids)


# ---------------------------------------------------------------------------------------------------------- formats


def test_detect_format():
    assert data.detect_format(["messages", "text"]) == "messages"
    assert data.detect_format(["prompt", "completion", "text"]) == "prompt_completion"
    assert data.detect_format(["prompt", "text"]) == "text"
    with pytest.raises(JaxtokError, match=r"columns \['body', 'prompt'\]; expected a column \"messages\""):
        data.detect_format(["prompt", "body"])


def test_explicit_format_needs_its_columns(tmp_path, tokenizer):
    assert data.check_format(["text", "messages"], "text") == "text"
    with pytest.raises(JaxtokError, match=r'"prompt_completion" needs a column "completion"'):
        data.check_format(["prompt", "text"], "prompt_completion")
    with pytest.raises(JaxtokError, match='unknown data format "chat"'):
        data.check_format(["text"], "chat")
    source = write(tmp_path / "rows.jsonl", [{"text": "hello"}])
    with pytest.raises(JaxtokError, match=r'rows.jsonl: data format "messages" needs a column "messages"'):
        data.prepare(source, tokenizer, "messages", 16, False)


# --------------------------------------------------------------------------------------------------------- encoding


def test_text_is_bos_text_eos_with_loss_on_all_but_the_first(tokenizer):
    text = tiny.CORPUS[0]
    ids, mask = data.encode({"text": text}, tokenizer, "text")
    assert ids == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[0] == tokenizer.bos_token_id
    assert mask == [0] + [1] * (len(ids) - 1)


def test_prompt_completion_loss_is_on_completion_and_eos(tokenizer):
    prompt, completion = "Question: what is 12 plus 30?", " Answer: 42."
    ids, mask = data.encode({"prompt": prompt, "completion": completion}, tokenizer, "prompt_completion")
    assert masked_text(tokenizer, ids, mask) == completion + tiny.EOS
    assert masked_text(tokenizer, ids, mask, value=0) == tiny.BOS + prompt
    assert ids[0] == tokenizer.bos_token_id and mask[-1] == 1


def test_assistant_only_loss_over_a_multi_turn_conversation(chat_tokenizer):
    ids, mask = data.encode({"messages": CONVERSATION}, chat_tokenizer, "messages")
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_text(chat_tokenizer, ids, mask) == "".join(reply + EOT for reply in replies)
    # Every other token, headers included, is context; the whole rendering is there, BOS once.
    rendering = chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == chat_tokenizer(rendering, add_special_tokens=False)["input_ids"]
    assert ids.count(chat_tokenizer.bos_token_id) == 1 and ids[0] == chat_tokenizer.bos_token_id
    unmasked = masked_text(chat_tokenizer, ids, mask, value=0)
    assert "You are terse." in unmasked and "What is 12 plus 30?" in unmasked and "It is" not in unmasked


def test_default_chat_template_has_the_llama_3_layout(chat_tokenizer):
    messages = CONVERSATION[:2]
    assert chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 12 plus 30?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_chat_template_argument_serves_tokenizers_without_one(tokenizer):
    tokenizer.add_tokens(list(data.DEFAULT_CHAT_TEMPLATE_TOKENS), special_tokens=True)
    row = {"messages": CONVERSATION[1:3]}
    with pytest.raises(JaxtokError, match="no chat template; set data.chat_template"):
        data.encode(row, tokenizer, "messages")
    ids, mask = data.encode(row, tokenizer, "messages", chat_template=data.DEFAULT_CHAT_TEMPLATE)
    assert masked_text(tokenizer, ids, mask) == "It is 42." + EOT


def test_a_template_that_only_appends_anywhere_works(chat_tokenizer):
    # A different layout (ChatML-like, no BOS, a newline after each turn): the spans come from rendering alone.
    template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant\n{% endif %}"
    )
    ids, mask = data.encode({"messages": CONVERSATION}, chat_tokenizer, "messages", chat_template=template)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_text(chat_tokenizer, ids, mask) == "".join(reply + EOT + "\n" for reply in replies)


def test_conversational_prompt_completion(chat_tokenizer):
    row = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}
    ids, mask = data.encode(row, chat_tokenizer, "prompt_completion")
    assert masked_text(chat_tokenizer, ids, mask) == "It is 42." + EOT
    assert ids == data.encode({"messages": CONVERSATION[:3]}, chat_tokenizer, "messages")[0]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "bot", "content": "hi"}], "message 0 of \"messages\" has role 'bot'; use one of system, user"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], 'message 1 of "messages" has no string "content"'),
        ([{"role": "user", "content": 3}], 'message 0 of "messages" has no string "content"'),
        (["hi"], 'message 0 of "messages" is a str, not a dict'),
        ("hi", '"messages" must be a non-empty list'),
        ([], '"messages" must be a non-empty list'),
    ],
)
def test_malformed_messages_name_the_row(tmp_path, chat_tokenizer, messages, message):
    source = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}, {"messages": messages}])
    with pytest.raises(JaxtokError, match=f"row 1 of .*chat.jsonl: {message}"):
        data.prepare(source, chat_tokenizer, "messages", 64, False)


def test_malformed_prompt_completion_and_text(tokenizer, chat_tokenizer):
    with pytest.raises(JaxtokError, match='"prompt" and "completion" must both be strings or both be lists'):
        data.encode({"prompt": "hi", "completion": CONVERSATION[2:3]}, chat_tokenizer, "prompt_completion")
    with pytest.raises(JaxtokError, match='column "text" must hold a string, got NoneType'):
        data.encode({"text": None}, tokenizer, "text")


def test_messages_without_a_template_fail_before_the_first_row(tmp_path, tokenizer):
    source = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(JaxtokError, match="no chat template; set data.chat_template"):
        data.prepare(source, tokenizer, "auto", 64, False)


def test_a_template_that_rewrites_history_is_refused(chat_tokenizer):
    # Renders only the last message: earlier replies are not where a prefix rendering puts them.
    template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(JaxtokError, match="renders a conversation differently from its beginning"):
        data.encode({"messages": CONVERSATION}, chat_tokenizer, "messages", chat_template=template)


# -------------------------------------------------------------------------------------------------------- sequences


def numbered(lengths):
    """Examples whose ids say which example and which position they are (100*k + t), loss on every token."""
    return [([100 * k + t for t in range(n)], [1] * n) for k, n in enumerate(lengths)]


def test_packing_keeps_documents_apart():
    lengths = [3, 4, 5, 2, 7, 1, 10]  # seq_len 8: [3, 4] [5, 2] [7] [8 of 10]; the 1-token example is dropped
    seq = data.build_sequences(numbered(lengths), seq_len=8, packing=True)
    assert set(seq) == set(data.SEQUENCE_KEYS) and all(a.dtype == np.int32 for a in seq.values())
    np.testing.assert_array_equal(
        seq["segment_ids"],
        [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 0], [1] * 8],
    )
    np.testing.assert_array_equal(seq["positions"][0], [0, 1, 2, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(seq["positions"][3], np.arange(8))
    np.testing.assert_array_equal(seq["loss_mask"][0], [0, 1, 1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(seq["loss_mask"][1], [0, 1, 1, 1, 1, 0, 1, 0])
    # Every segment is one whole example (or the truncated head of one), never split across rows.
    for r in range(4):
        for s in range(1, seq["segment_ids"][r].max() + 1):
            tokens = seq["tokens"][r][seq["segment_ids"][r] == s]
            k = tokens[0] // 100
            assert list(tokens) == numbered(lengths)[k][0][:8]
    assert (seq["tokens"][seq["segment_ids"] == 0] == 0).all()


def test_packing_truncates_and_keeps_the_examples_mask():
    example = (list(range(10, 22)), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    seq = data.build_sequences([example, (list(range(30, 33)), [0, 1, 1])], seq_len=6, packing=True)
    np.testing.assert_array_equal(seq["tokens"], [[10, 11, 12, 13, 14, 15], [30, 31, 32, 0, 0, 0]])
    np.testing.assert_array_equal(seq["loss_mask"], [[0, 0, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0]])


def test_padding_puts_one_example_per_row():
    seq = data.build_sequences(numbered([3, 1, 5, 9]), seq_len=6, packing=False)
    np.testing.assert_array_equal(seq["segment_ids"], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1] * 6])
    np.testing.assert_array_equal(seq["positions"], [[0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 0], np.arange(6)])
    np.testing.assert_array_equal(seq["loss_mask"], [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0] + [1] * 5])
    np.testing.assert_array_equal(seq["tokens"][2], [300, 301, 302, 303, 304, 305])


def test_prepare_reports_counts(tmp_path, tokenizer):
    source = write(tmp_path / "rows.jsonl", [{"text": t} for t in tiny.CORPUS[:6]])
    sequences, info = data.prepare(source, tokenizer, "text", seq_len=128, packing=True)
    lengths = [len(data.encode({"text": t}, tokenizer, "text")[0]) for t in tiny.CORPUS[:6]]
    assert info["rows"] == 6 and info["sequences"] == len(sequences["tokens"]) < 6
    assert info["tokens"] == sum(lengths) and info["target_tokens"] == sum(lengths) - 6
    assert info["dropped"] == info["truncated"] == 0


# ---------------------------------------------------------------------------------------------------------- batches


def row_sequences(E=10, T=4):
    """Sequences whose every token is its row's index, so a batch shows which rows it took."""
    tokens = np.repeat(np.arange(E, dtype=np.int32)[:, None], T, axis=1)
    return {"tokens": tokens, "positions": tokens * 0, "segment_ids": tokens * 0 + 1, "loss_mask": tokens * 0 + 1}


def rows_of(batch):
    return batch["tokens"][..., 0]


def test_batches_are_a_function_of_seed_and_step():
    a, b = data.Batches(row_sequences(), 3, 2, seed=5), data.Batches(row_sequences(), 3, 2, seed=5)
    batch = a.batch(0)
    assert set(batch) == set(data.SEQUENCE_KEYS)
    assert all(v.shape == (2, 3, 4) and v.dtype == np.int32 for v in batch.values())
    for step in range(8):
        a.batch(step)
    np.testing.assert_array_equal(rows_of(a.batch(7)), rows_of(b.batch(7)))  # b draws step 7 first
    c = data.Batches(row_sequences(), 3, 2, seed=6)
    assert any(not np.array_equal(rows_of(c.batch(s)), rows_of(a.batch(s))) for s in range(3))


def test_epochs_wrap_with_every_row_once_per_epoch():
    batches = data.Batches(row_sequences(E=10), batch_size=3, micro_batches=2, seed=0)  # 6 rows a step
    order = np.concatenate([rows_of(batches.batch(s)).reshape(-1) for s in range(5)])  # 30 rows, 3 epochs
    for epoch in range(3):
        assert sorted(order[10 * epoch : 10 * epoch + 10]) == list(range(10))
        expected = np.random.default_rng((0, epoch)).permutation(10)
        np.testing.assert_array_equal(order[10 * epoch : 10 * epoch + 10], expected)
    assert [batches.epoch_of(s) for s in range(5)] == [0, 0, 1, 1, 2]
    assert batches.num_rows == 10


def test_row_slices_partition_the_global_batch():
    batches = data.Batches(row_sequences(E=13), batch_size=6, micro_batches=2, seed=3)
    assert batches.shapes() == {key: (2, 6, 4) for key in data.SEQUENCE_KEYS}
    for step in (0, 4):
        pieces = [rows_of(batches.batch(step, rows=slice(2 * p, 2 * p + 2))) for p in range(3)]
        assert all(piece.shape == (2, 2) for piece in pieces)
        np.testing.assert_array_equal(np.concatenate(pieces, axis=1), rows_of(batches.batch(step)))


def test_a_device_reads_only_its_rows_and_global_batches_assemble_them():
    batches = data.Batches(row_sequences(E=13), batch_size=6, micro_batches=2, seed=3)
    whole = batches.batch(4)
    part = batches.batch(4, rows=slice(2, 4))
    for key in whole:
        np.testing.assert_array_equal(part[key], whole[key][:, 2:4])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    global_ = global_batch(batches, 4, batch_sharding(mesh))
    for key in whole:
        np.testing.assert_array_equal(np.asarray(global_[key]), whole[key])


def test_batches_refuse_bad_settings():
    with pytest.raises(JaxtokError, match="must be at least 1"):
        data.Batches(row_sequences(), 0)
    with pytest.raises(JaxtokError, match="must be at least 1"):
        data.Batches(row_sequences(), 4, micro_batches=0)
    with pytest.raises(JaxtokError, match="seed -1 must be non-negative"):
        data.Batches(row_sequences(), 4, seed=-1)


# ----------------------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(JaxtokError, match=r"data file .*nothere.jsonl does not exist; check the path"):
        data.load_rows(str(tmp_path / "nothere.jsonl"))


def test_unknown_file_type(tmp_path):
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(JaxtokError, match=r"rows.txt has an unknown type; use a .jsonl, .json, .parquet or .csv"):
        data.load_rows(str(tmp_path / "rows.txt"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', r"could not read .*bad.jsonl: .*; check .* valid json"),
        ("bad.json", '[{"text": "a"}, ', r"could not read data file .*bad.json: "),
        ("bad.parquet", "not parquet", r"could not read data file .*bad.parquet: .*magic bytes"),
        ("empty.jsonl", "", r"data file .*empty.jsonl is empty"),
        ("blank.jsonl", "\n\n", r"data file .*blank.jsonl has no rows"),
        ("none.json", "[]", r"data file .*none.json has no rows"),
        ("header.csv", "text\n", r"data file .*header.csv has no rows"),
    ],
)
def test_unreadable_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(JaxtokError, match=message):
        data.load_rows(str(tmp_path / name))


def test_a_dataset_name_that_cannot_be_loaded(monkeypatch):
    # Offline mode makes the failure immediate; without it the hub client retries for ~20 s before failing alike.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = r"could not load dataset someone/no \(split train\): .*; check the name and split"
    with pytest.raises(JaxtokError, match=message):
        data.load_rows("someone/no")


def test_no_usable_row(tmp_path, tokenizer):
    tokenizer.eos_token = None  # an empty text is then BOS alone
    source = write(tmp_path / "rows.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(JaxtokError, match=r"no row of .*rows.jsonl has two or more tokens"):
        data.prepare(source, tokenizer, "auto", 16, True)


def test_no_target_token(tmp_path, chat_tokenizer):
    source = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[:2]}])
    with pytest.raises(JaxtokError, match=r"no row of .*chat.jsonl has a token to learn"):
        data.prepare(source, chat_tokenizer, "auto", 64, False)


def test_bad_lengths(tmp_path, tokenizer):
    source = write(tmp_path / "rows.jsonl", [{"text": "hello"}])
    with pytest.raises(JaxtokError, match="sequence length is 1; it must be at least 2"):
        data.prepare(source, tokenizer, "auto", 1, True)
    with pytest.raises(JaxtokError, match="max_rows is 0"):
        data.prepare(source, tokenizer, "auto", 16, True, max_rows=0)
