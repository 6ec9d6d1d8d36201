"""The PNG report of a run: loss curves, teacher vs students, temperature softening."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import torch

from .io import atomic_path


def softened(logits: list[float], temperatures: list[float]) -> list[list[float]]:
    """softmax(logits / T) for each T."""
    z = torch.tensor(logits, dtype=torch.float64)
    return [torch.softmax(z / t, dim=-1).tolist() for t in temperatures]


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
    if log.is_file():
        for row in csv.DictReader(log.open()):
            if row.get("loss"):
                curves[row["stage"]][0].append(float(row["step"]))
                curves[row["stage"]][1].append(float(row["loss"]))
            if row.get("eval_accuracy"):
                evals[row["stage"]][0].append(float(row["epoch"]))
                evals[row["stage"]][1].append(float(row["eval_accuracy"]))

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    ax = axes[0]
    for stage, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=stage)
    ax.set(title="training loss", xlabel="optimiser step", ylabel="loss", yscale="log")
    ax.legend()

    ax = axes[1]
    for stage, (epochs, acc) in evals.items():
        ax.plot(epochs, acc, marker="o", label=stage)
    ax.set(title="eval accuracy per epoch", xlabel="epoch", ylabel="accuracy")
    ax.legend()

    ax = axes[2]
    names = list(metrics["models"])
    acc = [metrics["models"][n]["accuracy"] for n in names]
    agree = [metrics["models"][n].get("agreement", 1.0) for n in names]
    x = torch.arange(len(names)).tolist()
    ax.bar([i - 0.2 for i in x], acc, width=0.4, label="accuracy")
    ax.bar([i + 0.2 for i in x], agree, width=0.4, label="agreement with teacher")
    ax.set_xticks(x, [f"{n}\n{metrics['models'][n]['parameters']:,} params" for n in names])
    low = min(acc + agree)
    ax.set(title="teacher vs students (eval set)", ylim=(max(0.0, low - 0.05), 1.0))
    for i, a in zip(x, acc, strict=True):
        ax.annotate(f"{a:.3f}", (i - 0.2, a), ha="center", va="bottom", fontsize=8)
    ax.legend(loc="lower right")

    ax = axes[3]
    example = metrics["softening_example"]
    temperatures = example["temperatures"]
    for t, probs in zip(temperatures, softened(example["teacher_logits"], temperatures), strict=True):
        ax.plot(range(len(probs)), probs, marker="o", label=f"T = {t:g}")
    ax.set(title=f"teacher soft targets, one example (label {example['label']})",
           xlabel="class", ylabel="probability", yscale="log")
    ax.legend()

    fig.tight_layout()
    path = run_dir / "report.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
