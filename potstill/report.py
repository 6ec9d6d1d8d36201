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

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
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

    ax = axes[2]
    names = list(metrics["models"])
    headline = metrics.get("headline", [])
    width = 0.8 / max(len(headline), 1)
    for k, key in enumerate(headline):
        values = [metrics["models"][n].get(key) for n in names]
        xs = [i + (k - (len(headline) - 1) / 2) * width for i in range(len(names)) if values[i] is not None]
        ys = [v for v in values if v is not None]
        ax.bar(xs, ys, width=width, label=key)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.3f}", (x, y), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [f"{n}\n{metrics['models'][n]['parameters']:,} params" for n in names])
    ax.set(title="teacher vs students (eval set)")
    shown = [v for key in headline for n in names if (v := metrics["models"][n].get(key)) is not None]
    if shown and 0 <= min(shown) and max(shown) <= 1:  # fractions: zoom in on the differences
        ax.set_ylim(max(0.0, min(shown) - 0.05), 1.0)
    ax.legend(loc="lower right")

    ax = axes[3]
    example = metrics.get("softening_example")
    if metrics.get("kl_vs_l2"):
        _kl_vs_l2(ax, metrics["kl_vs_l2"], rows)
    elif example is None:
        ax.set_visible(False)
    else:
        _softening(ax, example)

    fig.tight_layout()
    path = run_dir / "report.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def _kl_vs_l2(ax, points: dict, rows: list[dict]) -> None:
    """A speech LLM's claim: next-token KL against the final hidden state's L2 (held-out clips per model,
    the held-out means after each epoch, and the training batches' values)."""
    train = [(float(r["mse[final_state]"]), float(r.get("kl") or r["monitor_kl"])) for r in rows
             if r.get("mse[final_state]") and (r.get("kl") or r.get("monitor_kl"))]
    if train:
        ax.scatter(*zip(*train, strict=True), s=8, alpha=0.3, color="grey", label="training batches")
    for name, pairs in points.items():
        if pairs:
            ax.scatter(*zip(*pairs, strict=True), s=14, alpha=0.7, label=f"{name} (held-out clips)")
    epochs = [(float(r["eval_hidden_l2"]), float(r["eval_kl_first"])) for r in rows
              if r.get("eval_hidden_l2") and r.get("eval_kl_first")]
    if epochs:
        ax.plot(*zip(*epochs, strict=True), marker="o", color="black", label="held-out mean, each epoch")
    ax.set(title="next-token KL vs final hidden-state L2", xlabel="L2 (mean squared, per dimension)",
           ylabel="KL(teacher ‖ student), first response token")
    values = [v for pair in [*train, *epochs, *(p for ps in points.values() for p in ps)] for v in pair]
    if values and min(values) > 0:
        ax.set(xscale="log", yscale="log")
    ax.legend(fontsize=8)


def _softening(ax, example: dict) -> None:
    temperatures = example["temperatures"]
    for t, probs in zip(temperatures, softened(example["teacher_logits"], temperatures), strict=True):
        ax.plot(range(len(probs)), probs, marker="o", label=f"T = {t:g}")
    ax.set(title=f"teacher soft targets, one example (label {example['label']})",
           xlabel="class", ylabel="probability", yscale="log")
    ax.legend()
