"""Is the distilled MiniLM student short of data? Continue it on sentences it never saw, or on seen ones.

Takes a finished ``minilm_distill.py`` run and trains its student further with the same objective:
``--data unseen`` on fresh perturbed copies of the polarity training sentences (another random
seed) and WikiText-2 test sentences, none of them in the run's transfer set; ``--data seen`` on
as many sentences of that transfer set (the control: the same extra steps, no new data). Both
report the held-out geometry, to be compared with the run's own.

    python benchmarks/minilm_continue.py runs/bench-minilm --data unseen \
        --out benchmarks/results/minilm_continue_unseen.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from minilm_distill import EVAL_SIZE, POLARITY, SHARED, augmented, polarity, wikitext_sentences

from potstill.distill import distill
from potstill.io import write_json, write_text
from potstill.recipes import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="the --runs folder of minilm_distill.py (holds transfer-set.txt, from-teacher/)")
    parser.add_argument("--data", choices=["unseen", "seen"], required=True)
    parser.add_argument("--sentences", type=int, default=32_000, help="1,000 steps of 32")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = Path(args.runs)
    lines = (runs / "transfer-set.txt").read_text(encoding="utf-8").splitlines()
    seen, held_out = lines[:-EVAL_SIZE], lines[-EVAL_SIZE:]
    if args.data == "unseen":
        held, excluded = set(held_out), set(seen) | set(held_out)
        in_domain = [s for s in polarity(POLARITY)[:-EVAL_SIZE] if s and s not in held]
        fresh = augmented(in_domain, 3, seed=2) + wikitext_sentences(SHARED / "text" / "wikitext2-test.txt")
        train = [s for s in fresh if s not in excluded]
    else:
        train = list(seen)
    random.Random(0).shuffle(train)
    train = train[: args.sentences]
    transfer = runs / f"continue-{args.data}.txt"
    write_text(transfer, "\n".join(train + held_out) + "\n")
    recipe = load_recipe(runs / "from-teacher" / "recipe.yaml", [
        f"data.files=[{transfer.resolve()}]", f"data.eval_size={EVAL_SIZE}", "data.max_train=null",
        f"student.model_name_or_path={(runs / 'from-teacher' / 'student').resolve()}",
        "student.layers_from_teacher=null", "train.epochs=1", f"train.learning_rate={args.learning_rate}",
        "train.checkpoint_every=250"])
    result = distill(recipe, runs / f"continue-{args.data}", progress=False, overwrite=True)
    before = json.loads((runs / "from-teacher" / "metrics.json").read_text())["models"]["student"]
    after = result.metrics["models"]["student"]
    write_json(Path(args.out), {"data": args.data, "sentences": len(train), "learning_rate": args.learning_rate,
                                "before": before, "after": after})
    for name, row in (("before", before), (f"after, {args.data}", after)):
        print(f"{name}: cosine {row['cosine_to_teacher']:.4f}, Spearman {row['spearman']:.4f}, "
              f"top-10 {row['top10_overlap']:.4f}")


if __name__ == "__main__":
    main()
