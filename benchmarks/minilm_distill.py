"""DistilBERT-style distillation of the real all-MiniLM-L6-v2 into 3 of its 6 layers, on sentence polarity.

Rows on 1,000 held-out sentences: the teacher; the 3-layer student cut from it (every other
layer) and distilled; the same student not distilled; a randomly initialised 3-layer student
distilled the same way. Metrics: mean cosine to the teacher's embeddings, Spearman correlation of
the 499,500 pairwise cosine similarities, top-10 neighbour overlap, forward speed (sentences/s,
tokenisation excluded).

    python benchmarks/minilm_distill.py --out benchmarks/results/minilm_distill.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from potstill.config import load_recipe
from potstill.distill import distill

POLARITY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text-classification" / "sentence_polarity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(POLARITY))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", default="runs/bench-minilm")
    parser.add_argument("--out", default="benchmarks/results/minilm_distill.json")
    args = parser.parse_args()

    pos = (Path(args.data) / "rt-polarity.pos").read_text(encoding="utf-8").splitlines()
    neg = (Path(args.data) / "rt-polarity.neg").read_text(encoding="utf-8").splitlines()
    sentences = [s for pair in zip(pos, neg, strict=True) for s in pair]  # interleaved: both classes held out
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(sentences) + "\n")
    common = [f"data.files=[{f.name}]", "data.eval_size=1000", f"train.epochs={args.epochs}"]
    runs = Path(args.runs)
    from_teacher = distill(load_recipe("minilm-distilbert-style", common), runs / "from-teacher", progress=False)
    random_init = distill(load_recipe("minilm-distilbert-style", [*common, "student.init=random"]),
                          runs / "random-init", progress=False)
    rows = dict(from_teacher.metrics["models"])
    rows["random init, distilled"] = random_init.metrics["models"]["student"]
    teacher_speed = rows["teacher"]["sentences_per_second"]
    for row in rows.values():
        row["speedup"] = row["sentences_per_second"] / teacher_speed
    result = {"train_sentences": len(sentences) - 1000, "eval_sentences": 1000, "epochs": args.epochs, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| model | parameters | cosine to teacher | Spearman | top-10 overlap | sentences/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['parameters']:,} | {r['cosine_to_teacher']:.3f} | {r['spearman']:.3f} | "
              f"{r['top10_overlap']:.3f} | {r['sentences_per_second']:.0f} | {r['speedup']:.2f}× |")


if __name__ == "__main__":
    main()
