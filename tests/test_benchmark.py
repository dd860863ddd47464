"""scripts/benchmark.py: a smoke run on the tiny shape (both frameworks, all variants, one step each), its FLOPs count
against a hand count, and its one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"
FIELDS = ("ms_per_step", "tokens_per_s", "peak_rss_mib", "xla_temp_mib", "flops_per_step", "gflops",
          "pct_matmul_peak", "trainable_params", "runs")


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


benchmark = load_script()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("torch")  # both frameworks
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("benchmark")
    proc = run("--shape", "tiny", "--repeats", "1", "--steps", "1", "--warmup", "1", "--out", str(out))
    return proc, out


@pytest.mark.slow  # both frameworks train each variant
def test_tiny_run_reports_every_variant_of_both_frameworks(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    rows = {(r["framework"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {(f, v) for f in ("jaxtok", "peft") for v in ("lora", "lora+rows", "lora+full")}
    for (framework, variant), row in rows.items():
        assert row["error"] is None
        for field in FIELDS:
            assert field in row, (framework, variant, field)
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_mib"] > 0
        assert row["flops_per_step"] == benchmark.step_flops(benchmark.SHAPES["tiny"], variant).step
        assert len(row["runs"]) == 1 and len(row["runs"][0]["step_times_s"]) == 1
        assert (row["xla_temp_mib"] is not None) == (framework == "jaxtok")  # PEFT on CPU has none
    for variant in ("lora", "lora+rows", "lora+full"):  # both frameworks train the same parameters
        assert rows["jaxtok", variant]["trainable_params"] == rows["peft", variant]["trainable_params"]
    assert report["matmul"]["float32"]["gflops"] > 0
    assert report["machine"]["backend"] == "cpu" and report["versions"]["jax"]
    ratios = report["ratios"]["tiny/float32/remat=none"]
    assert set(ratios["jaxtok/peft"]) == {"lora", "lora+rows", "lora+full"}
    assert set(ratios["rows/lora"]) == set(ratios["full/lora"]) == {"jaxtok", "peft"}
    assert all(r > 0 for group in ratios.values() for r in group.values())

    table = (out / "results.md").read_text()
    assert "| shape | dtype | remat | framework | variant | ms/step |" in table
    assert table.count("| tiny | float32 | none |") == 6
    assert report["machine"]["cpu"] in table and "peft " in table
    assert table.strip() in proc.stdout  # printed at the end too


@pytest.mark.slow  # both frameworks train each setting
def test_a_sweep_of_dtype_and_remat_has_a_row_per_setting(tmp_path):
    pytest.importorskip("torch")  # both frameworks
    pytest.importorskip("peft")
    proc = run("--shape", "tiny", "--variants", "lora", "--dtype", "bfloat16", "--remat", "full,dots", "--repeats",
               "1", "--steps", "1", "--warmup", "0", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["dtype"], r["remat"], r["framework"]): r for r in report["results"]}
    # PEFT's gradient checkpointing is remat "full"; it has nothing like "dots"
    assert set(rows) == {("bfloat16", "full", "jaxtok"), ("bfloat16", "dots", "jaxtok"), ("bfloat16", "full", "peft")}
    assert all(r["error"] is None and r["ms_per_step"] > 0 for r in rows.values())
    assert set(report["matmul"]) == {"bfloat16"} and report["matmul"]["bfloat16"]["gflops"] > 0
    assert report["ratios"]["tiny/bfloat16/remat=full"]["jaxtok/peft"]["lora"] > 0
    assert report["ratios"]["tiny/bfloat16/remat=dots"]["jaxtok/peft"] == {}
    assert "| tiny | bfloat16 | dots | jaxtok | lora |" in (tmp_path / "results.md").read_text()
    assert any("remat dots: jaxtok only" in note for note in report["notes"])


def test_step_flops_against_a_hand_count():
    shape = benchmark.Shape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, mlp=16, vocab=50, batch=2,
                            seq_len=3)
    tokens, rank = 6, 2
    # Per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x16 each, down 16x8 = 64+32+32+64+128+128+128 = 576 weights.
    # LoRA (in + out) per map: q 16, k 12, v 12, o 16, gate 24, up 24, down 24 = 128, times rank 2 = 256.
    # Head 50x8 = 400. Attention per layer 4*B*T*T*N*H = 4*2*3*3*2*4 = 576.
    forward = 2 * tokens * (2 * (576 + 256) + 400) + 2 * 576
    assert forward == 25920
    lora = benchmark.step_flops(shape, "lora", rank=rank, rows=3)
    assert lora.forward == forward
    assert lora.input_grads == forward + 2 * 576  # the attention backward has twice its forward's products
    assert lora.weight_grads == 2 * tokens * 2 * 256
    assert lora.step == 2 * forward + 2 * 576 + 6144
    assert 2 * forward <= lora.step <= 2.5 * forward  # roughly twice the forward
    rows = benchmark.step_flops(shape, "lora+rows", rank=rank, rows=3)
    full = benchmark.step_flops(shape, "lora+full", rank=rank, rows=3)
    assert rows.step == lora.step + 2 * tokens * 3 * 8
    assert full.step == lora.step + 2 * tokens * 50 * 8
    for name in benchmark.SHAPES:
        s = benchmark.SHAPES[name]
        steps = [benchmark.step_flops(s, v).step for v in ("lora", "lora+rows", "lora+full")]
        assert steps[2] > steps[1] >= steps[0]


def test_the_1b_shape_is_llama_3_2_1b():
    s = benchmark.SHAPES["1b"]
    params = s.vocab * s.hidden + s.layers * (2 * s.hidden * s.heads * s.head_dim + 2 * s.hidden * s.kv_heads
                                              * s.head_dim + 3 * s.hidden * s.mlp + 2 * s.hidden) + s.hidden
    assert params == 1_235_814_400  # Llama-3.2-1B's parameter count (tied head)


@pytest.mark.parametrize("args, message", [
    (("--shape", "XL"), "error: unknown shape 'XL'; choose from tiny, S, M, 1b"),
    (("--shape", "tiny", "--variants", "lora,full"), "error: unknown variant 'full'"),
    (("--frameworks", "torch"), "error: unknown framework 'torch'"),
    (("--dtype", "float16"), "error: unknown dtype 'float16'"),
    (("--remat", "none,some"), "error: unknown remat policy 'some'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = run(*args, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "results.json").exists()


def test_peft_asked_for_but_not_installed(tmp_path):
    runner = REPO / "tests" / "no_torch_runner.py"
    proc = subprocess.run([sys.executable, str(runner), str(SCRIPT), "--shape", "tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: torch, peft not installed") and proc.stderr.count("\n") == 1, proc.stderr
