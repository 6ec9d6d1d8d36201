"""Hinton et al. 2015 §3 at our scale: MNIST teacher, scratch student, distilled student; dark knowledge.

For each seed: a 1200-1200 ReLU MLP teacher with dropout, trained on images jittered by up to 2
pixels; an 800-800 student trained on hard labels only (no regularisation); the same student
distilled at a high temperature. Then the paper's "dark knowledge" experiment: distil with every
3 removed from the transfer set and count how many 3s the student still gets right.

Data: the 10,000-image MNIST set that ships with potstill, split 8,000 train / 2,000 eval (the
paper trained on 60,000 and tested on 10,000, so our error counts are also given per 10,000).

    python benchmarks/hinton_mnist.py --seeds 0 1 2 3 4 --out benchmarks/results/hinton_mnist.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from potstill.distill import distill
from potstill.recipes import load_recipe

PAPER = {"teacher": 67, "scratch": 146, "student": 74}


def overrides(seed: int, temperature: float, alpha: float, epochs: int) -> list[str]:
    return [
        f"data.split_seed={seed}", f"teacher.train.seed={seed}", f"train.seed={seed}",
        "teacher.hidden_sizes=[1200, 1200]", "teacher.dropout=0.5", "teacher.input_dropout=0.2",
        "teacher.jitter=2", f"teacher.train.epochs={epochs}",
        "student.hidden_sizes=[800, 800]", f"train.epochs={epochs}",
        f"distillation.temperature={temperature}", f"distillation.alpha={alpha}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--runs", default="runs/bench-hinton")
    parser.add_argument("--out", default="benchmarks/results/hinton_mnist.json")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        start = time.time()
        base = overrides(seed, args.temperature, args.alpha, args.epochs)
        run_dir = Path(args.runs) / f"seed{seed}"
        main_run = distill(load_recipe("mnist", base), run_dir, progress=False).metrics
        dark = distill(load_recipe("mnist", [*base, "baseline=false", "data.exclude_from_transfer=[3]",
                                             f"teacher.model_name_or_path={run_dir / 'teacher'}"]),
                       Path(args.runs) / f"seed{seed}-no3", progress=False).metrics
        n_eval = main_run["eval_examples"]
        row = {"seed": seed, "eval_examples": n_eval, "seconds": round(time.time() - start, 1)}
        for name in ("teacher", "scratch", "student"):
            row[f"{name}_errors"] = main_run["models"][name]["errors"]
        row["no3_student_errors"] = dark["models"]["student"]["errors"]
        row["no3_accuracy_on_3s"] = dark["models"]["student"]["accuracy_on_excluded_classes"]["3"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    def summary(key: str) -> dict[str, float]:
        values = [r[key] for r in rows]
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    result = {"config": vars(args), "paper_errors_per_10k": PAPER, "seeds": rows,
              "summary": {k: summary(k) for k in ("teacher_errors", "scratch_errors", "student_errors",
                                                  "no3_student_errors", "no3_accuracy_on_3s")}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    n = rows[0]["eval_examples"]
    print(f"\n| model | errors / {n} (mean ± std, {len(rows)} seeds) | per 10,000 | paper (per 10,000) |")
    print("|---|---|---|---|")
    for name in ("teacher", "scratch", "student"):
        s = result["summary"][f"{name}_errors"]
        print(f"| {name} | {s['mean']:.1f} ± {s['std']:.1f} | {s['mean'] * 10_000 / n:.0f} | {PAPER[name]} |")
    s = result["summary"]["no3_accuracy_on_3s"]
    print(f"\nno 3s in the transfer set: student gets {100 * s['mean']:.1f}% ± {100 * s['std']:.1f}% of 3s right")


if __name__ == "__main__":
    main()
