"""train.method through the command line: each of lora, lora+rows, lora+full and rows trains what it says and leaves
everything else bit-identical, its exports (PEFT adapter, merged checkpoint) give the run's own eval_loss in PEFT and
transformers, scripts/export.py rebuilds them from the run's checkpoint, and bad method settings are one-line
errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

import tiny
from jaxtok.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
METHODS = ("lora", "lora+rows", "lora+full", "rows")
SEQ_LEN = 32
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
ADAPTER_EMBED = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
ADAPTER_HEAD = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
# An ordinary token the data use as an input with a target after it, trained besides <|end_of_text|>: the EOS row
# never trains in the embedding (in "text" rows EOS is last, so nothing is predicted from it), so alone it could not
# tell a trained embedding row from a frozen one.
ORDINARY = "Ġthe"
# rows: PEFT's TrainableTokensConfig has one list of ids for the embedding and the untied head, so the head trains the
# embedding's ids (with train_head=added the run is refused before training; see test_bad_method_settings)
EXTRA = {"rows": ("--config.tokens.train_head=all",)}

pytestmark = pytest.mark.slow  # each method trains through the command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny untied checkpoint (vocabulary 300, full, so <|x|> gets id 300), text data using <|x|>, and a config."""
    return tiny.write_run_files(
        tmp_path_factory.mktemp("methods"), vocab=300, rows=40, eval_rows=6,
        **{"tokens.train": (tiny.EOS, ORDINARY), "lora.rank": 4, "optim.lr": 5e-3, "optim.token_lr": 2e-2,
           "train.steps": 6, "train.batch_size": 4, "train.seq_len": SEQ_LEN, "train.save_every": 0,
           "sample.max_new_tokens": 0})


def _cli(config: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(SCRIPT), f"--config={config}", f"--config.output_dir={output_dir}", *overrides]


def _run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Runs short commands (mostly imports and loading a tiny model) side by side; their completed processes."""
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    done = []
    for command, process in zip(commands, processes):
        try:
            out, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        done.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    """method -> (output_dir, stdout + stderr) of one short run of each method (one after another: 2 shared CPUs)."""
    done = {}
    for method in METHODS:
        out = tmp_path_factory.mktemp("run") / method.replace("+", "_")
        result = subprocess.run(_cli(files / "config.py", out, f"--config.train.method={method}",
                                     *EXTRA.get(method, ())), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{method}: {result.stderr[-3000:]}"
        done[method] = (out, result.stdout + result.stderr)
    return done


@pytest.fixture(scope="module")
def ids(files):
    """(added id, [tokens.train ids]) as the run's tokenizer numbers them."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(files / "model")
    vocab = tokenizer.get_vocab()
    return 300, [vocab[tiny.EOS], vocab[ORDINARY]]


def _base(files) -> dict:
    return load_file(str(files / "model" / "model.safetensors"))


def _merged(out: Path) -> dict:
    return load_file(str(out / "merged" / "model.safetensors"))


def _changed_rows(merged: np.ndarray, base: np.ndarray) -> set[int]:
    """Ids of the base's rows that are not bit-identical in `merged`."""
    return set(np.flatnonzero(np.any(merged[: len(base)] != base, axis=1)).tolist())


def _layer_names(base: dict) -> list[str]:
    return [name for name in base if name not in (EMBED, HEAD)]


def _is_lora_target(name: str) -> bool:
    return any(f".{p}.weight" in name for p in PROJECTIONS)


def _assert_identical(merged: dict, base: dict, names) -> None:
    for name in names:
        assert merged[name].dtype == base[name].dtype, name
        np.testing.assert_array_equal(merged[name], base[name], err_msg=name)


def _assert_only_lora_targets_trained(merged: dict, base: dict) -> list[str]:
    """Every LoRA-targeted layer tensor of the merged checkpoint moved, every other layer tensor (norms) is the
    base's bit for bit; returns the targeted names."""
    targets = [n for n in _layer_names(base) if _is_lora_target(n)]
    for name in targets:
        assert not np.array_equal(merged[name], base[name]), f"{name} did not train"
    _assert_identical(merged, base, [n for n in _layer_names(base) if not _is_lora_target(n)])
    return targets


def test_lora_trains_lora_only_and_keeps_the_added_rows_as_they_start(files, runs, ids):
    out, log = runs["lora"]
    added, _ = ids
    base, merged = _base(files), _merged(out)
    assert "token rows (embedding): none" in log
    assert set(merged) == set(base)
    assert len(_assert_only_lora_targets_trained(merged, base)) == 2 * len(PROJECTIONS)
    for name in (EMBED, HEAD):
        assert merged[name].shape == (301, tiny.HIDDEN)
        np.testing.assert_array_equal(merged[name][:300], base[name], err_msg=name)  # tokens.train ids too
        # the added row starts as the mean of the base's rows (jaxtok.vocab._grow), and stays so
        mean = base[name].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(merged[name][added], mean, rtol=0, atol=1e-6, err_msg=name)
    # the adapter brings the added token's frozen rows as trainable tokens, the only way PEFT can bring them
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["trainable_token_indices"] == {"embed_tokens": [added], "lm_head": [added]}
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(adapter[ADAPTER_EMBED], merged[EMBED][[added]])
    np.testing.assert_array_equal(adapter[ADAPTER_HEAD], merged[HEAD][[added]])


def test_lora_rows_trains_lora_and_the_token_rows_only(files, runs, ids):
    out, _ = runs["lora+rows"]
    added, trained = ids
    base, merged = _base(files), _merged(out)
    _assert_only_lora_targets_trained(merged, base)
    embed_changed = _changed_rows(merged[EMBED], base[EMBED])
    assert embed_changed == {trained[1]}, "only the trained ordinary token's row (EOS's has no gradient)"
    assert not np.allclose(merged[EMBED][added], base[EMBED].mean(axis=0), atol=1e-6), "added row did not train"
    # tokens.train_head=added: of the head, only the added token's row trains
    assert _changed_rows(merged[HEAD], base[HEAD]) == set()
    assert not np.allclose(merged[HEAD][added], base[HEAD].mean(axis=0), atol=1e-6), "added head row did not train"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["trainable_token_indices"] == {"embed_tokens": [added, *trained], "lm_head": [added]}


def test_lora_full_trains_the_whole_embedding_and_head(files, runs, ids):
    out, log = runs["lora+full"]
    added, trained = ids
    base, merged = _base(files), _merged(out)
    _assert_only_lora_targets_trained(merged, base)
    token_ids = {added, *trained}
    embed_changed = _changed_rows(merged[EMBED], base[EMBED])
    head_changed = _changed_rows(merged[HEAD], base[HEAD])
    # every token the data use as an input moves in the embedding; every row of the head gets a gradient
    assert len(embed_changed - token_ids) > 30, sorted(embed_changed)
    assert head_changed == set(range(300)), sorted(set(range(300)) - head_changed)
    assert "token rows (embedding): none" in log
    # PEFT carries whole matrices as modules_to_save
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] is None
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"] and config["ensure_weight_tying"] is False


def test_rows_trains_the_token_rows_only(files, runs, ids):
    out, log = runs["rows"]
    added, trained = ids
    base, merged = _base(files), _merged(out)
    assert "no LoRA" in log
    _assert_identical(merged, base, _layer_names(base))  # every layer's weights and the norms
    assert _changed_rows(merged[EMBED], base[EMBED]) == {trained[1]}  # EOS's embedding row has no gradient
    assert _changed_rows(merged[HEAD], base[HEAD]) == set(trained)  # tokens.train_head=all
    for name in (EMBED, HEAD):
        assert not np.allclose(merged[name][added], base[name].mean(axis=0), atol=1e-6), f"{name}: added row"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS"
    assert config["token_indices"] == [added, *trained]
    assert sorted(config["target_modules"]) == ["embed_tokens", "lm_head"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert not any("lora_" in name for name in adapter)
    np.testing.assert_array_equal(adapter["base_model.model.model.embed_tokens.trainable_tokens_delta"],
                                  merged[EMBED][[added, *trained]])
    np.testing.assert_array_equal(adapter["base_model.model.lm_head.trainable_tokens_delta"],
                                  merged[HEAD][[added, *trained]])


def _torch_eval(model, tokenizer, texts: list[str], new_ids) -> dict:
    """jaxtok's eval_loss of the "text" eval rows: each row tokenized with BOS and EOS appended (data._encode_text),
    cut to seq_len, not packed; summed next-token cross-entropy over all rows / the number of predicted tokens. And
    the new-token accuracy: argmax hits at targets in `new_ids` / those targets."""
    import torch

    total, count, hits, scored = 0.0, 0, 0, 0
    for text in texts:
        ids = (list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id])[:SEQ_LEN]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
        targets = torch.tensor(ids[1:])
        total += torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum").item()
        count += len(ids) - 1
        new = torch.isin(targets, torch.tensor(list(new_ids)))
        hits += int((logits[:-1].argmax(-1) == targets)[new].sum())
        scored += int(new.sum())
    return {"loss": total / count, "tokens": count, "new_token_acc": hits / scored, "new_tokens": scored}


@pytest.mark.parametrize("method", METHODS)
def test_exports_give_the_runs_eval_loss_in_peft_and_transformers(files, runs, ids, method):
    torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")

    out, _ = runs[method]
    added, trained = ids
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6]
    final = evals[-1]
    acc = final["eval_new_token_acc"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    texts = [json.loads(line)["text"] for line in (files / "eval.jsonl").read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer) == 301
    results = {}
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    results["merged"] = _torch_eval(merged, tokenizer, texts, (added, *trained))
    base = transformers.AutoModelForCausalLM.from_pretrained(files / "model", dtype=torch.float32)
    base.resize_token_embeddings(len(transformers.AutoTokenizer.from_pretrained(out / "adapter")))
    adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    results["peft"] = _torch_eval(adapted, tokenizer, texts, (added, *trained))
    for name, result in results.items():
        assert result["tokens"] == final["eval_tokens"], name
        assert abs(result["loss"] - final["eval_loss"]) <= 1e-5 * final["eval_loss"], (name, result, final)
        # the added token and both tokens.train ids are new tokens, whatever the method trains
        assert result["new_tokens"] > 0 and result["new_token_acc"] == acc, (name, result, final)
    assert final["eval_loss"] < evals[0]["eval_loss"]


def test_bad_method_settings_are_one_line_errors(files, tmp_path):
    cases = [
        (["--config.train.method=full"], "error: train.method must be one of lora, lora+rows, lora+full, rows"),
        (["--config.train.method=rows", "--config.tokens.add=()", "--config.tokens.train=()"],
         "error: train.method=rows trains token rows, but tokens.add, tokens.train and tokens.train_untrained "
         "give none"),
        # PEFT's rows-only adapter has one id list for embedding and head: refused before training, not after
        (["--config.train.method=rows"], "error: PEFT's TrainableTokensConfig has one token_indices list"),
    ]
    failures = []
    outs = [tmp_path / f"out{k}" for k in range(len(cases))]
    results = _run_all([_cli(files / "config.py", out, *overrides) for out, (overrides, _) in zip(outs, cases)])
    for out, (overrides, expected), result in zip(outs, cases, results):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        started = (out / "checkpoints").exists()
        if result.returncode != 2 or len(lines) != 1 or not lines[0].startswith(expected) or started:
            failures.append(f"{overrides}: exit {result.returncode}, stderr {result.stderr[-800:]!r}")
    assert not failures, "\n".join(failures)


def test_export_command_rebuilds_each_methods_exports(runs, tmp_path):
    """scripts/export.py from the last checkpoint writes what the run wrote at its end: lora's adapter (with the added
    token's frozen rows), and lora+full's adapter and merged checkpoint (with its trained embedding and head)."""
    export = str(ROOT / "scripts" / "export.py")
    cases = [("lora", "peft", "adapter_model.safetensors"), ("lora+full", "merged", "model.safetensors"),
             ("lora+full", "peft", "adapter_model.safetensors")]
    targets = [tmp_path / f"{fmt}-{method}" for method, fmt, _ in cases]
    commands = [[sys.executable, export, f"--run={runs[method][0]}", f"--format={fmt}", f"--out={target}"]
                for (method, fmt, _), target in zip(cases, targets)]
    results = _run_all(commands)
    for (method, fmt, name), target, result in zip(cases, targets, results):
        assert result.returncode == 0, f"{method}: {result.stderr[-2000:]}"
        expected = load_file(str(runs[method][0] / ("adapter" if fmt == "peft" else "merged") / name))
        chex.assert_trees_all_equal(load_file(str(target / name)), expected, custom_message=method)
