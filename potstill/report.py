"""The PNG report of a run, drawn from ``log.csv`` and ``metrics.json``.

Panels, as the run has data for them:

* training terms: the hard-label cross-entropy of every stage on one axis (the same quantity for
  the teacher, the scratch baseline and the student), the distillation terms on another;
* held-out metrics against optimiser steps (``train.eval_every``, and each epoch's end), one
  panel per metric: the task's quality metric next to KL to the teacher and agreement;
* teacher vs students: one panel per headline metric, its axis zoomed to show the differences;
* the task's own panels (``metrics["panels"]``): e.g. the temperature-softened soft targets of
  a classifier, word error rate against speed for speech.

A task panel is ``{"title", "xlabel", "ylabel", "kind": "line" | "scatter", "series": {label: {"x": [...],
"y": [...]}}}`` with optional ``"xscale"`` / ``"yscale"``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import atomic_path

#: log.csv columns that are not terms of the training loss
_NOT_TERMS = {"stage", "epoch", "step", "loss", "lr", "train_loss", "seconds"}
#: how many panels of each kind at most
MAX_EVAL_PANELS, MAX_HEADLINE_PANELS = 3, 3

Series = dict[str, tuple[list[float], list[float]]]


def _curves(rows: list[dict[str, str]], column: str) -> Series:
    """``column`` against the optimiser step, per stage."""
    out: Series = defaultdict(lambda: ([], []))
    for row in rows:
        if row.get(column) not in (None, ""):
            out[row["stage"]][0].append(float(row["step"]))
            out[row["stage"]][1].append(float(row[column]))
    return dict(out)


def _line_panel(ax: Any, series: Series, title: str, ylabel: str, marker: str = "") -> None:
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=marker, label=label)
    ax.set(title=title, xlabel="optimiser step", ylabel=ylabel)
    if series:
        ax.legend(fontsize=8)


def _zoomed(values: list[float]) -> tuple[float, float]:
    """Axis limits that show the differences between ``values`` (not from zero)."""
    low, high = min(values), max(values)
    pad = (high - low) * 0.25 or abs(high) * 0.05 or 0.05
    return low - pad, high + pad


def _bars(ax: Any, metrics: dict[str, Any], key: str) -> None:
    # each model keeps its colour across panels (its place in the run: teacher, scratch, student)
    models = [(n, m[key], f"C{i}") for i, (n, m) in enumerate(metrics["models"].items())
              if isinstance(m.get(key), (int, float))]
    names, values = [n for n, _, _ in models], [float(v) for _, v, _ in models]
    bars = ax.bar(range(len(values)), values, color=[c for _, _, c in models])
    ax.set_ylim(*_zoomed(values))
    ax.set_xticks(range(len(names)), names)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.4g}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    ax.set(title=f"teacher vs students: {key}")


def _task_panel(ax: Any, spec: dict[str, Any]) -> None:
    for label, points in spec["series"].items():
        if spec.get("kind") == "scatter":
            ax.scatter(points["x"], points["y"], label=label, s=14)
        else:
            ax.plot(points["x"], points["y"], marker="o", markersize=3, label=label)
    ax.set(title=spec.get("title", ""), xlabel=spec.get("xlabel", ""), ylabel=spec.get("ylabel", ""))
    for axis in ("xscale", "yscale"):
        if spec.get(axis):
            getattr(ax, f"set_{axis}")(spec[axis])
    if len(spec["series"]) > 1:
        ax.legend(fontsize=8)


def _parameters_line(metrics: dict[str, Any]) -> str:
    counts = [(n, m.get("parameters")) for n, m in metrics["models"].items()]
    return "parameters: " + ", ".join(f"{n} {c:,}" for n, c in counts if isinstance(c, int))


def panels(rows: list[dict[str, str]], metrics: dict[str, Any]) -> list[Callable[[Any], None]]:
    """The report's panels, each a function that draws on one matplotlib axis."""
    drawn: list[Callable[[Any], None]] = []
    terms = [c for c in dict.fromkeys(k for row in rows for k in row)
             if c not in _NOT_TERMS and not c.startswith("eval_") and any(row.get(c) for row in rows)]
    if "cross_entropy" in terms:
        series = _curves(rows, "cross_entropy")
        drawn.append(lambda ax, s=series: _line_panel(ax, s, "hard-label cross-entropy (training)",
                                                       "nats per position"))
    distillation = [t for t in terms if t != "cross_entropy"]
    if distillation:
        series = {f"{stage} {t}": c for t in distillation for stage, c in _curves(rows, t).items()}
        drawn.append(lambda ax, s=series: _line_panel(ax, s, "distillation terms (training)", "value"))
    if not terms and any(row.get("loss") for row in rows):
        series = _curves(rows, "loss")
        drawn.append(lambda ax, s=series: _line_panel(ax, s, "training loss", "loss"))
    headline = [k for k in metrics.get("headline", []) if any(isinstance(m.get(k), (int, float))
                                                             for m in metrics["models"].values())]
    evals = [c for c in dict.fromkeys(k for row in rows for k in row) if c.startswith("eval_")]
    evals = sorted(evals, key=lambda c: c.removeprefix("eval_") not in headline)  # stable: the log's order otherwise
    for column in evals[:MAX_EVAL_PANELS]:
        series = _curves(rows, column)
        drawn.append(lambda ax, s=series, c=column: _line_panel(ax, s, f"{c.removeprefix('eval_')} during training",
                                                                 c.removeprefix("eval_"), marker="o"))
    for key in headline[:MAX_HEADLINE_PANELS]:
        drawn.append(lambda ax, k=key: _bars(ax, metrics, k))
    for spec in metrics.get("panels", []):
        drawn.append(lambda ax, s=spec: _task_panel(ax, s))
    return drawn


def write_report(run_dir: str | Path) -> Path:
    """Draw ``report.png`` from ``log.csv`` and ``metrics.json`` in ``run_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = run_dir / "log.csv"
    rows = list(csv.DictReader(log.open())) if log.is_file() else []
    drawn = panels(rows, metrics)
    columns = min(3, max(1, len(drawn)))
    lines = math.ceil(len(drawn) / columns) or 1
    fig, axes = plt.subplots(lines, columns, figsize=(6 * columns, 4.2 * lines), squeeze=False)
    for ax, draw in zip(axes.flat, drawn, strict=False):
        draw(ax)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.suptitle(f"{run_dir.name}: {_parameters_line(metrics)}", fontsize=10)
    fig.tight_layout()
    path = run_dir / "report.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
