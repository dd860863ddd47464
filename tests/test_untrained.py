"""tokens.train_untrained: the base's untrained rows are found by the documented criterion, listed by
scripts/inspect_tokens.py, and exactly those the data use train, beside tokens.add and tokens.train."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import tiny
from jaxtok.errors import JaxtokError
from jaxtok.run_config import RunConfig, default_config
from jaxtok.untrained import RATIO, read_untrained
from jaxtok.vocab import plan_rows

ROOT = Path(__file__).resolve().parents[1]
EMBED_ZERO, EMBED_SCALE, HEAD_ZERO, HEAD_SCALE = (3, 40), (7, 299), (11,), (40, 120)


@pytest.fixture(scope="module")
def damaged(checkpoint, tmp_path_factory):
    """`damaged(tied, dtype)` -> the directory of a copy of a tiny checkpoint, with its tokenizer, whose embedding rows
    (and head rows, when untied) were zeroed or scaled down."""
    cache = {}

    def get(tied: bool, dtype="float32"):
        if (tied, dtype) not in cache:
            target = tmp_path_factory.mktemp("damaged") / "model"
            shutil.copytree(checkpoint(tied=tied, dtype=dtype, vocab=300), target)
            tiny.make_tokenizer(target)
            head = {} if tied else {"head_zero": HEAD_ZERO, "head_scale": HEAD_SCALE}
            tiny.damage_rows(target, embed_zero=EMBED_ZERO, embed_scale=EMBED_SCALE, **head)
            cache[tied, dtype] = target
        return cache[tied, dtype]

    return get


DAMAGED = pytest.mark.parametrize("tied, dtype", [(True, "float32"), (False, "float32"), (False, "bfloat16")],
                                  ids=["tied", "untied", "untied-bf16"])


@DAMAGED
def test_finds_zeroed_and_scaled_rows(checkpoint, damaged, tied, dtype):
    found = read_untrained(damaged(tied, dtype))
    assert found.embed_ids == tuple(sorted(EMBED_ZERO + EMBED_SCALE))
    assert found.head_ids == (() if tied else tuple(sorted(HEAD_ZERO + HEAD_SCALE)))
    assert found.ids == tuple(sorted(set(EMBED_ZERO + EMBED_SCALE) | (set() if tied else set(HEAD_ZERO + HEAD_SCALE))))
    assert (found.head_norms is None) == tied
    # the checkpoint before the damage has none
    assert read_untrained(checkpoint(tied=tied, dtype=dtype, vocab=300)).ids == ()


@DAMAGED
def test_norms_are_those_of_the_weights_transformers_loads(damaged, tiny_torch, tied, dtype):
    """The norms relative to the median row's, and the rows they flag."""
    torch = pytest.importorskip("torch")
    directory = damaged(tied, dtype)
    found, hf = read_untrained(directory), tiny_torch.load_model(directory)
    matrices = [(hf.get_input_embeddings().weight, found.embed_norms, found.embed_ids)]
    if not tied:
        matrices.append((hf.get_output_embeddings().weight, found.head_norms, found.head_ids))
    for rows_VD, norms, ids in matrices:
        expected = torch.linalg.vector_norm(rows_VD.detach().double(), dim=1).numpy()
        expected = expected / np.median(expected)  # of an even count: the mean of the middle two, not torch's lower
        np.testing.assert_allclose(norms, expected, rtol=1e-4, atol=1e-12)
        assert ids == tuple(np.flatnonzero(expected <= RATIO).tolist())


@pytest.mark.slow  # scripts/inspect_tokens.py end to end
def test_inspect_tokens_lists_the_rows(damaged):
    directory = damaged(False)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "inspect_tokens.py"), f"--model={directory}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    expected = sorted(set(EMBED_ZERO + EMBED_SCALE + HEAD_ZERO + HEAD_SCALE))
    assert lines[0].endswith(f"{len(expected)} of 300 tokens have untrained rows (norm <= 0.001 x the median row "
                             f"norm): embedding {len(EMBED_ZERO + EMBED_SCALE)}, head {len(HEAD_ZERO + HEAD_SCALE)}")
    assert lines[1:3] == ["smallest embedding row: 0 x the median (id 3 " + repr(tokens(directory, [3])[0]) + ")",
                          "smallest head row: 0 x the median (id 11 " + repr(tokens(directory, [11])[0]) + ")"]
    assert [int(line.split()[0]) for line in lines[4:]] == expected
    assert lines[3].split() == ["id", "token", "embedding", "head"]
    columns = {int(line.split()[0]): line.split()[1:] for line in lines[4:]}
    names = tokens(directory, expected)
    assert [columns[i][0] for i in expected] == [repr(name) for name in names]
    assert float(columns[3][1]) == 0.0 and float(columns[3][2]) > RATIO  # zeroed in the embedding only
    assert float(columns[11][1]) > RATIO and float(columns[11][2]) == 0.0  # zeroed in the head only
    assert 0 < float(columns[7][1]) <= RATIO  # scaled down
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "inspect_tokens.py"), "--model=/nonexistent"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: model directory /nonexistent does not exist; pass a model directory or a Hub id (org/name)")


def test_plan_with_untrained_rows():
    # untied: the untrained rows train in the embedding and, like added tokens, in the head; one also listed under
    # tokens.train is planned once
    rows = plan_rows((300,), (1, 7), tied=False, untrained=(7, 9, 12))
    assert rows.embed_ids == (300, 1, 7, 9, 12) and rows.head_ids == (300, 7, 9, 12)
    assert plan_rows((300,), (1,), tied=False, head="all", untrained=(9,)).head_ids == (300, 1, 9)
    assert plan_rows((300,), (1,), tied=False, head="none", untrained=(9,)).head_ids == ()
    assert plan_rows((300,), (1,), tied=True, untrained=(9, 300)).embed_ids == (300, 1, 9)  # an added id counts once


def test_refused_with_an_imported_adapter(tmp_path):
    config = default_config()
    config.tokens.train_untrained, config.model.adapter, config.output_dir = True, "some/adapter", str(tmp_path)
    with pytest.raises(JaxtokError, match="model.adapter brings its own token rows; set tokens.train_untrained"):
        RunConfig.of(config)


@pytest.mark.slow  # trains through the command line
def test_run_trains_exactly_the_untrained_rows_the_data_use(untrained_run):
    r = untrained_run
    damaged = sorted({i for ids in r.damaged.values() for i in ids})
    ordinary, listed_damaged = r.trained
    assert listed_damaged in damaged and ordinary not in damaged
    def names(ids):
        return ", ".join(f"{i} {name!r}" for i, name in zip(ids, tokens(r.root / "model", ids)))

    log = r.log
    assert "untrained rows in the base (norm <= 0.001 x the median row norm): 5 tokens (embedding 3, head 2)" in log
    assert f"untrained rows that train (the data use them): {names(damaged)}\n" in log
    assert f"untrained rows left as they are (the data never use them): {names([r.unused])}\n" in log

    # what changed in the export: the rows of the added token, of tokens.train and of the untrained tokens the data
    # use, in the embedding; those of the added and the untrained ones in the (untied) head; nothing else
    base = load_file(str(r.root / "model" / "model.safetensors"))
    merged = load_file(str(r.out / "merged" / "model.safetensors"))
    for name, expected in (("model.embed_tokens.weight", {ordinary, *damaged}), ("lm_head.weight", set(damaged))):
        before, after = base[name], merged[name]
        assert after.shape == (301, before.shape[1])  # the added token's row
        changed = {int(i) for i in np.flatnonzero(np.any(after[:300] != before, axis=1))}
        assert changed == expected, name
    assert not np.any(merged["model.embed_tokens.weight"][r.unused])  # left as it was: zero


def tokens(directory: Path, ids) -> list[str]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory).convert_ids_to_tokens(list(ids))
