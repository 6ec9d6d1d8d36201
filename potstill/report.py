"""The PNG report of a run: loss curves, teacher vs students, temperature softening."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import torch

from .io import atomic_path
from .losses import soft_targets


def softened(logits: list[float], temperatures: list[float]) -> list[list[float]]:
    """Hinton's soft targets softmax(logits / T) for each T."""
    z = torch.tensor(logits, dtype=torch.float64)
    return [soft_targets(z, t).tolist() for t in temperatures]


def write_report(run_dir: str | Path) -> Path:
    """Draw ``report.png`` from ``log.csv`` and ``metrics.json`` in ``run_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    curves: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    evals: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    log = run_dir / "log.csv"
    rows = list(csv.DictReader(log.open())) if log.is_file() else []
    # the first per-epoch eval metric the task logs (eval_accuracy, eval_bits_per_byte, ...)
    eval_key = next((k for k in (rows[0] if rows else {}) if k.startswith("eval_")), None)
    for row in rows:
        if row.get("loss"):
            curves[row["stage"]][0].append(float(row["step"]))
            curves[row["stage"]][1].append(float(row["loss"]))
        if eval_key and row.get(eval_key):
            evals[row["stage"]][0].append(float(row["epoch"]))
            evals[row["stage"]][1].append(float(row[eval_key]))

    names = list(metrics["models"])
    groups = _headline_groups(metrics, names)
    example = metrics.get("softening_example")
    fig, axes = plt.subplots(1, 2 + len(groups) + (example is not None),
                             figsize=(5 * (2 + len(groups) + (example is not None)), 4.5), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    for stage, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=stage)
    ax.set(title="training loss", xlabel="optimiser step", ylabel="loss", yscale="log")
    if curves:
        ax.legend()

    ax = axes[1]
    for stage, (epochs, acc) in evals.items():
        ax.plot(epochs, acc, marker="o", label=stage)
    ax.set(title=f"{eval_key or 'eval'} per epoch", xlabel="epoch", ylabel=eval_key or "")
    if evals:
        ax.legend()

    for ax, headline in zip(axes[2:], groups, strict=False):
        _bars(ax, metrics, names, headline)

    if example is not None:
        _softening(axes[-1], example)

    fig.tight_layout()
    path = run_dir / "report.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def _headline_groups(metrics: dict, names: list[str]) -> list[list[str]]:
    """The headline metrics, one bar chart each, except that fractions (every value in [0, 1]) share one."""
    headline = metrics.get("headline", [])
    values = {key: [v for n in names if (v := metrics["models"][n].get(key)) is not None] for key in headline}
    fractions = [k for k in headline if values[k] and 0 <= min(values[k]) and max(values[k]) <= 1]
    groups = [fractions if k == fractions[0] else [k] for k in headline if k not in fractions[1:]] if fractions \
        else [[k] for k in headline]
    return groups or [[]]


def _bars(ax, metrics: dict, names: list[str], headline: list[str]) -> None:
    width = 0.8 / max(len(headline), 1)
    for k, key in enumerate(headline):
        values = [metrics["models"][n].get(key) for n in names]
        xs = [i + (k - (len(headline) - 1) / 2) * width for i in range(len(names)) if values[i] is not None]
        ys = [v for v in values if v is not None]
        ax.bar(xs, ys, width=width, label=key)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:,.0f}" if abs(y) >= 100 else f"{y:.3g}" if abs(y) >= 10 else f"{y:.3f}", (x, y),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [f"{n}\n{metrics['models'][n]['parameters']:,} params" for n in names])
    ax.set(title="teacher vs students (eval set)" if len(headline) != 1 else f"{headline[0]} (eval set)")
    shown = [v for key in headline for n in names if (v := metrics["models"][n].get(key)) is not None]
    if len(headline) > 1 and shown and 0 <= min(shown) and max(shown) <= 1:  # fractions: zoom in on the differences
        ax.set_ylim(max(0.0, min(shown) - 0.05), 1.0)
    if len(headline) > 1:
        ax.legend(loc="lower right")


def _softening(ax, example: dict) -> None:
    temperatures = example["temperatures"]
    for t, probs in zip(temperatures, softened(example["teacher_logits"], temperatures), strict=True):
        ax.plot(range(len(probs)), probs, marker="o", label=f"T = {t:g}")
    ax.set(title=f"teacher soft targets, one example (label {example['label']})",
           xlabel="class", ylabel="probability", yscale="log")
    ax.legend()
