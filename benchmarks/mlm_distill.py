"""Masked-LM distillation with DistilBERT's recipe, at small scale: our version of its ablation table.

A 6-layer BERT-style teacher (256 wide, WordPiece of 4,096 tokens) is trained here with masked-LM
cross-entropy on real English prose: WikiText-2 validation (CC BY-SA 3.0) and the State of the Union
addresses 1945-2006 (public domain), from ``../shared/data/text``. Each student takes every other
teacher layer (0, 2, 4), with the embeddings and the head, and trains on the same text for the
same budget. Rows, each with 3 seeds (training order, masks, dropout, the random init):

- the teacher;
- the triple loss: KL at T = 2 on every real token (×5), masked-LM CE (×2), cosine of the last
  hidden states (×1) — DistilBERT's recipe, ``recipes/distilbert.yaml``;
- the same student trained with masked-LM CE only;
- ablations: no KL, no cosine, no masked-LM CE; random initialisation instead of the teacher's
  layers (triple loss).

Held out: WikiText-2 *test*, never trained on, with one fixed mask (15%, 80/10/10) for every model;
masked-token accuracy, masked-LM loss, agreement with the teacher, and pseudo-perplexity (every
token masked in turn) on its first sequences. WikiText is cleaned the same way for training and
evaluation: headings dropped, ``@-@`` joins undone, ``<unk>`` removed.

    python benchmarks/mlm_distill.py --out benchmarks/results/mlm_distill.json

The teacher is trained once (``--work``/teacher-run, resumable); each row is a ``potstill distill``
run with the teacher loaded from there (``--work``/rows/NAME-sSEED, skipped when finished), run
``--processes`` at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"
_JOINS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}

#: row → recipe overrides (every row but the teacher is a student cut from the teacher's layers 0, 2, 4)
ROWS: dict[str, list[str]] = {
    "triple loss": [],
    "MLM only": ["distillation.weights.kl=0", "distillation.weights.cosine=0"],
    "no KL": ["distillation.weights.kl=0"],
    "no cosine": ["distillation.weights.cosine=0"],
    "no MLM CE": ["distillation.weights.mlm=0"],
    "random init": ["student.init=random"],
}
METRICS = ("masked_token_accuracy", "accuracy_vs_teacher", "mlm_loss", "pseudo_perplexity", "agreement",
           "kl_to_teacher")

# the same data, teacher and evaluation for every row
BASE = ["data.max_length=128", "data.tokenizer.vocab_size=4096", "data.max_eval_examples=600",
        "data.pseudo_perplexity_sequences=4",
        "teacher.hidden_size=256", "teacher.num_layers=6", "teacher.num_heads=4", "teacher.intermediate_size=1024",
        "teacher.train.batch_size=32", "teacher.train.learning_rate=7e-4", "teacher.train.warmup_steps=100",
        "teacher.train.weight_decay=0.01", "teacher.train.scheduler=linear",
        # a short budget: more, smaller steps (the recipe's accumulation of 4 is tested in CI, not here)
        "train.batch_size=16", "train.gradient_accumulation_steps=1", "train.learning_rate=5e-4",
        "train.warmup_steps=10"]


def clean_wikitext(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for joined, plain in _JOINS.items():
            line = line.replace(joined, plain)
        lines.append(re.sub(r"\s+", " ", line.replace("<unk>", " ")).strip())
    return "\n".join(lines) + "\n"


def prepare_text(work: Path, shared: Path) -> dict[str, list[str]]:
    """Cleaned copies of the training and held-out text under ``work/text``."""
    from potstill.io import write_text

    folder = work / "text"
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "wikitext2-valid.txt", clean_wikitext((shared / "wikitext2-valid.txt").read_text()))
    write_text(folder / "wikitext2-test.txt", clean_wikitext((shared / "wikitext2-test.txt").read_text()))
    union = [p.read_text(encoding="latin-1") for p in sorted((shared / "state_union").glob("*.txt"))]
    write_text(folder / "state-union.txt", "\n".join(union))  # some addresses are Latin-1 (data README)
    return {"files": [str(folder / "wikitext2-valid.txt"), str(folder / "state-union.txt")],
            "eval_files": [str(folder / "wikitext2-test.txt")]}


def data_overrides(text: dict[str, list[str]]) -> list[str]:
    return [f"data.files={json.dumps(text['files'])}", f"data.eval_files={json.dumps(text['eval_files'])}"]


def train_teacher(work: Path, overrides: list[str]) -> tuple[Path, float, float]:
    """The teacher, trained once in ``work/teacher-run`` (resumed or loaded when there)."""
    from potstill.distill import Run
    from potstill.recipes import load_recipe

    run_dir = work / "teacher-run"
    if (run_dir / "teacher" / "history.json").is_file():  # trained: nothing to check or load
        return run_dir / "teacher", 0.0, 0.0
    recipe = load_recipe("distilbert", [*overrides, "baseline=false", f"output_dir={run_dir}"])
    start, cpu = time.perf_counter(), time.process_time()
    run = Run.open(recipe, run_dir, overwrite=False, progress=True)  # a bar in the log: the teacher takes long
    run.teacher()
    return run_dir / "teacher", time.perf_counter() - start, time.process_time() - cpu


def run_row(job: tuple[str, int, list[str], str]) -> dict[str, Any]:
    """One row and seed: a ``potstill distill`` run (skipped when finished); its metrics."""
    import torch

    from potstill.distill import distill
    from potstill.recipes import load_recipe

    torch.set_num_threads(1)
    name, seed, overrides, folder = job
    run_dir = Path(folder)
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return {"row": name, "seed": seed, "metrics": metrics, "seconds": metrics.get("benchmark_seconds"),
                "cpu_seconds": metrics.get("benchmark_cpu_seconds")}
    recipe = load_recipe("distilbert", [*overrides, "baseline=false", f"train.seed={seed}", f"output_dir={run_dir}"])
    start, cpu = time.perf_counter(), time.process_time()
    result = distill(recipe, progress=False)
    # the machine is shared: the process's CPU time says what the row costs, the wall time what it took here
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    metrics = {**result.metrics, "benchmark_seconds": seconds, "benchmark_cpu_seconds": cpu_seconds}
    from potstill.io import write_json

    write_json(run_dir / "metrics.json", metrics)
    return {"row": name, "seed": seed, "metrics": metrics, "seconds": seconds, "cpu_seconds": cpu_seconds}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds per row; the teacher; paired differences with the triple loss."""
    rows: dict[str, Any] = {}
    by_row: dict[str, dict[int, dict[str, float]]] = {}
    for r in results:
        by_row.setdefault(r["row"], {})[r["seed"]] = r["metrics"]["models"]["student"]
    teacher = results[0]["metrics"]["models"]["teacher"]
    rows["teacher"] = {k: teacher.get(k) for k in ("parameters", *METRICS) if k in teacher}
    for name, seeds in by_row.items():
        entry: dict[str, Any] = {"seeds": sorted(seeds), "parameters": next(iter(seeds.values()))["parameters"]}
        for metric in METRICS:
            values = [seeds[s][metric] for s in sorted(seeds) if seeds[s].get(metric) is not None]
            if not values:
                continue
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{metric}_per_seed"] = values
        triple = by_row.get("triple loss", {})
        shared = sorted(set(seeds) & set(triple))
        if name != "triple loss" and shared:
            diffs = [seeds[s]["masked_token_accuracy"] - triple[s]["masked_token_accuracy"] for s in shared]
            entry["accuracy_minus_triple"] = statistics.fmean(diffs)
            entry["accuracy_minus_triple_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        rows[name] = entry
    return rows


def _cell(row: dict[str, Any], metric: str, fmt: str) -> str:
    if row.get(metric) is None:
        return "—"
    spread = row.get(f"{metric}_std")
    return f"{row[metric]:{fmt}}" + (f" ± {spread:{fmt}}" if spread else "")


def table(rows: dict[str, Any]) -> str:
    lines = [f"{'model':<14} {'params':>10} {'masked acc':>17} {'vs teacher':>15} {'pseudo-ppl':>13} "
             f"{'agree':>15} {'Δacc vs triple':>15}"]
    for name, r in rows.items():
        delta = (f"{100 * r['accuracy_minus_triple']:+.2f} ± {100 * r['accuracy_minus_triple_std']:.2f}"
                 if "accuracy_minus_triple" in r else "")
        lines.append(f"{name:<14} {r['parameters']:>10,} {_cell(r, 'masked_token_accuracy', '.4f'):>17} "
                     f"{_cell(r, 'accuracy_vs_teacher', '.3f'):>15} {_cell(r, 'pseudo_perplexity', '.1f'):>13} "
                     f"{_cell(r, 'agreement', '.3f'):>15} {delta:>15}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/mlm-bench", help="teacher, rows and cleaned text (resumable)")
    parser.add_argument("--shared", default=str(SHARED), help="folder of wikitext2-*.txt and state_union/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--teacher-only", action="store_true", help="train (or resume) the teacher, then stop")
    parser.add_argument("--student-examples", type=int, default=2000,
                        help="training sequences of 128 tokens the students see (spread over the text)")
    parser.add_argument("--student-epochs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe overrides for every run (after the benchmark's own)")
    parser.add_argument("--out", default="benchmarks/results/mlm_distill.json")
    args = parser.parse_args()

    import torch

    from potstill.io import write_json

    torch.set_num_threads(1)
    work = Path(args.work)
    text = prepare_text(work, Path(args.shared))
    common = [*BASE, *data_overrides(text), f"teacher.train.epochs={args.teacher_epochs}", *args.set]
    teacher, teacher_seconds, teacher_cpu = train_teacher(work, common)
    print(f"teacher: {teacher} ({teacher_seconds:.0f} s, {teacher_cpu:.0f} s of CPU this call)", flush=True)
    if args.teacher_only:
        return
    student = [*common, f"teacher.model_name_or_path={teacher}", f"data.max_train_examples={args.student_examples}",
               f"train.epochs={args.student_epochs}", *args.set]  # --set last: it wins
    jobs = [(name, seed, [*student, *ROWS[name]], str(work / "rows" / f"{name.replace(' ', '-')}-s{seed}"))
            for seed in args.seeds for name in args.rows]
    results = []
    with ProcessPoolExecutor(args.processes) as pool:
        for result in pool.map(run_row, jobs):
            student_row = result["metrics"]["models"]["student"]
            print(f"{result['row']:<14} seed {result['seed']}: masked-token accuracy "
                  f"{student_row['masked_token_accuracy']:.4f}, pseudo-perplexity "
                  f"{student_row['pseudo_perplexity']:.1f} ({result['seconds'] or 0:.0f} s, "
                  f"{result['cpu_seconds'] or 0:.0f} s of CPU)", flush=True)
            results.append(result)
    rows = summarise(results)
    first = results[0]["metrics"]
    out = {"rows": rows, "per_run_seconds": {f"{r['row']} s{r['seed']}": r["seconds"] for r in results},
           "per_run_cpu_seconds": {f"{r['row']} s{r['seed']}": r["cpu_seconds"] for r in results},
           "teacher_history": json.loads((teacher / "history.json").read_text()),
           "eval_sequences": first["eval_sequences"], "eval_targets": first["eval_targets"],
           "pseudo_perplexity_sequences": first["pseudo_perplexity_sequences"], "vocab_size": first["vocab_size"],
           "student_examples": args.student_examples, "student_epochs": args.student_epochs,
           "teacher_epochs": args.teacher_epochs, "seeds": args.seeds, "overrides": args.set,
           "torch_threads_per_run": 1, "processes": args.processes}
    write_json(Path(args.out), out)
    print(table(rows))


if __name__ == "__main__":
    main()
