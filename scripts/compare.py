"""The token-training study: each method in jaxtok and in PEFT, from the same start, on identical batches.

    python scripts/compare.py --config configs/compare_demo.py --out runs/compare
    python scripts/compare.py --config configs/compare_demo.py --methods lora,lora+rows --frameworks jaxtok
    python scripts/compare.py --config configs/llama32.py --config.train.steps=100 --config.data.eval=eval.jsonl \\
        --methods lora,lora+rows,lora+full --out runs/compare-llama32

Methods (`train.method`): lora (LoRA only, added tokens' rows frozen at their start), lora+rows, lora+full (LoRA and
the whole embedding and head), rows (token rows only). Frameworks: jaxtok, and peft (PyTorch; needs
`pip install torch==2.13.0 && pip install -e ".[peft]"`). Both frameworks start from jaxtok's initial adapter and
see the same batches, optimizer and schedule (jaxtok/compare/__init__.py says how); each run is a process of its own.

Writes OUT/results.json (every run's losses, evaluations, trainable parameters, step time and peak memory, and the
largest relative difference of the per-step losses across frameworks), OUT/report.md, OUT/loss.png and OUT/cost.png.
The config needs data.eval; any key can be overridden with --config.KEY=VALUE.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jaxtok.cli import comma_names, parse_config, run_main  # noqa: E402
from jaxtok.compare import FRAMEWORKS, PROGRESS, RESULT, start_dir  # noqa: E402
from jaxtok.errors import JaxtokError  # noqa: E402

METHODS = ("lora", "lora+rows", "lora+full", "rows")  # jaxtok.trainable.METHODS, without importing jax here


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(--config arguments, the others)."""
    config, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            config += [f"--config={argv[i + 1]}"]
            i += 2
            continue
        (config if arg.startswith(("--config=", "--config.")) else rest).append(arg)
        i += 1
    return config, rest


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    config_args, rest = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="run config (required); --config.KEY=VALUE overrides a key")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="jaxtok,peft or either alone")
    parser.add_argument("--out", default="runs/compare", help="output folder (runs/compare)")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--no-train", action="store_true", help=argparse.SUPPRESS)
    if "-h" in rest or "--help" in rest:
        parser.parse_args(["--help"])
    args = parser.parse_args(rest)
    if not config_args:
        raise JaxtokError("--config FILE is required, e.g. --config configs/compare_demo.py")
    return args, config_args


def worker(args: argparse.Namespace, config_args: list[str]) -> None:
    from jaxtok.compare import report_result

    start = start_dir(Path(args.out), args.method)
    if args.worker == "peft":
        from jaxtok.compare import peft_worker

        return report_result(peft_worker.run(start))
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from jaxtok.compare import jax_worker

    config = load_config(config_args, args.method, Path(args.out))
    result = jax_worker.run(config, start, train=not args.no_train)
    if result is not None:
        report_result(result)


def load_config(config_args: list[str], method: str, out: Path):
    """The run config of `method`'s jaxtok run, as typed sections; a bad key or value fails here."""
    from jaxtok.run_config import RunConfig

    config = parse_config([sys.argv[0], *config_args])
    config.train.method = method
    config.output_dir = str(out / "runs" / method / "jaxtok")
    return RunConfig.of(config)


def run_worker(command: list[str], log: Path, bar, label: str) -> dict | None:
    """Runs one worker, moving `bar` as it reports steps; its result, or None for a worker that only prepares."""
    bar.set_description(label)
    base = bar.n
    result = None
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                bar.update(base + int(line.split()[1]) - bar.n)
            elif line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
        proc.wait()
    if proc.returncode != 0:
        lines = log.read_text().strip().splitlines() or ["(no output)"]
        if proc.returncode == 2 and lines[-1].startswith("error: "):
            raise JaxtokError(lines[-1][len("error: "):])
        raise JaxtokError(f"the {label} run failed (exit status {proc.returncode}): {lines[-1]}; its log: {log}")
    return result


def main() -> None:
    args, config_args = parse_args(sys.argv[1:])
    if args.worker:
        return worker(args, config_args)
    methods = comma_names(args.methods, METHODS, "method")
    frameworks = comma_names(args.frameworks, FRAMEWORKS, "framework")
    if "peft" in frameworks:
        missing = [p for p in ("torch", "peft") if importlib.util.find_spec(p) is None]
        if missing:
            raise JaxtokError(f"{', '.join(missing)} not installed: `pip install torch==2.13.0 && pip install -e "
                              "\".[peft]\"`, or run --frameworks jaxtok")
    from tqdm.auto import tqdm

    from jaxtok.compare import report

    out = Path(args.out)
    config = load_config(config_args, methods[0], out)  # a bad key or value fails now, not in the first worker
    if not config.data.eval:
        raise JaxtokError("a comparison evaluates before and after training: set data.eval")
    notes = []
    if config.lora.dropout > 0 and len(frameworks) > 1:
        notes.append(f"lora.dropout={config.lora.dropout}: the frameworks draw different dropout masks, so their "
                     "losses differ by more than rounding")
    steps = config.train.steps
    runs = []
    command = [sys.executable, str(Path(__file__).resolve()), *config_args, f"--out={out}"]
    with tqdm(total=steps * len(methods) * len(frameworks), unit="step", dynamic_ncols=True) as bar:
        for method in methods:
            start_dir(out, method).parent.mkdir(parents=True, exist_ok=True)
            for framework in ("jaxtok", "peft"):
                if framework not in frameworks and not (framework == "jaxtok" and "peft" in frameworks):
                    continue
                prepare_only = framework not in frameworks  # PEFT alone still starts from jaxtok's start
                log = start_dir(out, method).parent / f"{framework}.log"
                result = run_worker(command + [f"--worker={framework}", f"--method={method}"]
                                    + (["--no-train"] if prepare_only else []), log, bar, f"{framework} {method}")
                if result is not None:
                    runs.append(result)
    shown = " ".join(["python", "scripts/compare.py", *sys.argv[1:]])
    results = report.write(out, runs, shown, notes)
    print((out / "report.md").read_text())
    for method, diff in results["max_rel_loss_diff"].items():
        print(f"{method}: jaxtok vs PEFT, largest relative difference of the per-step loss: {diff:.2e}")
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'loss.png'}, {out / 'cost.png'}")


if __name__ == "__main__":
    run_main(main)
