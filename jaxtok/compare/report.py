"""A comparison's outputs: results.json, report.md, loss.png and cost.png."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from jaxtok.compare import FRAMEWORKS


def max_rel_loss_diff(runs: list[dict]) -> dict[str, float]:
    """Per method run in both frameworks: max over steps of |loss_jaxtok - loss_peft| / |loss_peft|."""
    by = {(r["framework"], r["method"]): r["losses"] for r in runs}
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        a, b = by.get(("jaxtok", method)), by.get(("peft", method))
        if a and b:
            out[method] = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    return out


def machine(runs: list[dict]) -> str:
    """The host CPU, and the devices the runs ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    devices = ", ".join(f"{f} on {d}" for f, d in dict.fromkeys((r["framework"], r["device"]) for r in runs))
    return f"{cpu}, {os.cpu_count()} cores; {devices}"


def write(out: Path, runs: list[dict], command: str, notes: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = {"runs": runs, "max_rel_loss_diff": max_rel_loss_diff(runs), "command": command, "machine": machine(runs),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "notes": notes}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(runs, out / "loss.png")
    plot_costs(runs, out / "cost.png")
    (out / "report.md").write_text(markdown(results))
    return results


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    lines = [
        "## Teaching a model new tokens: methods and frameworks", "",
        f"- command: `{results['command']}`",
        f"- machine: {results['machine']} (step time and peak memory are measured there; each run in its own "
        "process, peak memory is that process's peak resident memory, framework included)",
        f"- date: {results['date']}",
        *[f"- note: {note}" for note in results["notes"]],
        "",
        "| method | framework | trainable params | eval loss before → after | new-token acc before → after | "
        "ms/step | peak memory MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['method']} | {r['framework']} | {r['trainable_params']:,} | {r['eval_loss_before']:.4f} → "
            f"{r['eval_loss_after']:.4f} | {_fmt(r['new_token_acc_before'], '.2f')} → "
            f"{_fmt(r['new_token_acc_after'], '.2f')} | {r['step_ms']:.1f} | {r['peak_memory_mb']:,.0f} |")
    diffs = results["max_rel_loss_diff"]
    if diffs:
        lines += ["", "Across frameworks, on identical batches from the same start (largest relative difference of "
                  "the training loss over all steps; of the final evaluation loss):", "",
                  "| method | train loss, max rel. diff | eval loss after, rel. diff |", "|---|---|---|"]
        by = {(r["framework"], r["method"]): r for r in results["runs"]}
        for method, diff in diffs.items():
            a, b = by["jaxtok", method]["eval_loss_after"], by["peft", method]["eval_loss_after"]
            lines.append(f"| {method} | {diff:.2e} | {abs(a - b) / abs(b):.2e} |")
    lines += ["", "![losses](loss.png)", "", "![cost](cost.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


STYLES = {"jaxtok": dict(linestyle="-", marker="o"), "peft": dict(linestyle="--", marker="x")}


def plot_losses(runs: list[dict], path: Path) -> None:
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    fig, (train, evals) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        label, style = f"{r['method']} ({r['framework']})", STYLES[r["framework"]]
        steps = range(1, len(r["losses"]) + 1)
        train.plot(steps, r["losses"], color=colors[r["method"]], linestyle=style["linestyle"], label=label)
        evals.plot([e["step"] for e in r["evals"]], [e["eval_loss"] for e in r["evals"]], color=colors[r["method"]],
                   label=label, **style)
    for ax, title in ((train, "training loss (solid: jaxtok, dashed: PEFT)"), (evals, "evaluation loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    evals.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_costs(runs: list[dict], path: Path) -> None:
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in runs))
    frameworks = [f for f in FRAMEWORKS if any(r["framework"] == f for r in runs)]
    by = {(r["framework"], r["method"]): r for r in runs}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(frameworks)
    for ax, key, title in zip(axes, ("trainable_params", "peak_memory_mb", "step_ms"),
                              ("trainable parameters", "peak memory (MB)", "step time (ms)")):
        for i, framework in enumerate(frameworks):
            values = [by[framework, m][key] if (framework, m) in by else 0 for m in methods]
            ax.bar([j + (i - (len(frameworks) - 1) / 2) * width for j in range(len(methods))], values, width,
                   label=framework, hatch="" if framework == "jaxtok" else "//")
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(title)
        if key == "trainable_params":
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
