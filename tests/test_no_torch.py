"""jaxtok works where torch (and peft) are not installed: simulated by tests/no_torch_runner.py in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "no_torch_runner.py"
EVAL = REPO / "scripts" / "eval.py"


def run(*command) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, command)], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def eval_inputs(checkpoint, tmp_path_factory):
    """(checkpoint directory with a tokenizer, data file) for scripts/eval.py."""
    directory = checkpoint()
    tmp = tmp_path_factory.mktemp("no_torch")
    model_dir = tmp / "model"
    shutil.copytree(directory, model_dir)
    tiny.make_tokenizer(model_dir)
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny.CORPUS[:7]))
    return model_dir, data


def eval_result(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # scripts/eval.py end to end, twice
def test_eval_script_without_torch(eval_inputs):
    model_dir, data = eval_inputs
    args = [EVAL, "--model", model_dir, "--data", data, "--seq-len", 10, "--batch-size", 4]
    without = eval_result(run(RUNNER, *args))
    normal = eval_result(run(*args))
    assert without["tokens"] == normal["tokens"]
    assert without["eval_loss"] == pytest.approx(normal["eval_loss"], rel=1e-6)


IMPORTS = """
import importlib, importlib.util, pkgutil, sys

for name in ("torch", "peft"):
    assert importlib.util.find_spec(name) is None, name
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"{name} imported")

import jaxtok.convert, jaxtok.model, jaxtok.generate, jaxtok.evaluate, jaxtok.step, jaxtok.optimizer, jaxtok.trainable
import jaxtok

modules = [m.name for m in pkgutil.iter_modules(jaxtok.__path__)]
for name in modules:
    importlib.import_module("jaxtok." + name)

import transformers.utils
assert not transformers.utils.is_torch_available()
print("imported", len(modules), "modules")
"""


def test_jaxtok_imports_without_torch(tmp_path):
    script = tmp_path / "imports.py"
    script.write_text(IMPORTS)
    result = run(RUNNER, script)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout


def test_runner_blocks_torch(tmp_path):
    """The simulation itself: `import torch` fails like a missing package, and the exit status is the script's."""
    script = tmp_path / "uses_torch.py"
    script.write_text("import sys\ntry:\n    import torch\nexcept ModuleNotFoundError:\n    sys.exit(7)\n")
    result = run(RUNNER, script)
    assert result.returncode == 7, result.stderr


@pytest.mark.slow  # trains through the command line
def test_training_job_and_export_without_torch(tmp_path):
    """The main job and its exports run as `pip install -e .` leaves them: with no torch at all."""
    files = tiny.write_run_files(tmp_path, vocab=300, rows=16, **{"lora.rank": 2, "train.steps": 2,
                                                                 "train.batch_size": 2, "train.seq_len": 16})
    out = tmp_path / "run"
    result = run(RUNNER, REPO / "scripts" / "train.py", f"--config={files / 'config.py'}", f"--config.output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    result = run(RUNNER, REPO / "scripts" / "export.py", f"--run={out}", "--format=peft", f"--out={tmp_path / 'peft'}")
    assert result.returncode == 0, result.stderr[-2000:]
