"""DistilBERT-style distillation of the real all-MiniLM-L6-v2 into 3 of its 6 layers.

Rows on 1,000 held-out sentence-polarity sentences: the teacher; the 3-layer student cut from
it (the recipe's influence:3 layers, 0, 4, 5) and distilled; the same student not distilled; a randomly initialised
3-layer student distilled the same way. Metrics: mean cosine to the teacher's embeddings,
Spearman correlation of the 499,500 pairwise cosine similarities, top-10 neighbour overlap,
forward speed (sentences/s, tokenisation excluded).

The transfer set is the other 9,662 polarity sentences, plus (``--extra``, on by default) real
English sentences from ``../shared/data/text``: WikiText-2 validation (CC BY-SA 3.0) and the
State of the Union addresses (public domain), split into sentences, plus (``--augment``) perturbed
copies of the polarity sentences. No held-out sentence is trained on. The objective is the
recipe's (``recipes/minilm-distilbert-style.yaml``); any recipe field can be overridden with ``--set``.

    python benchmarks/minilm_distill.py --out benchmarks/results/minilm_distill.json

``--score RUN_DIR`` trains nothing: it scores that run's student on the held-out sentences and on
as many sentences of its own transfer set (polarity, and WikiText-2 / State of the Union), which
tells a generalisation gap (seen sentences fit far better) from missing capacity (both fit alike).
``--in-domain N --views V`` trains on the first N polarity sentences at a fixed budget of V sentence
views: a point of the data-scaling curve in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch

from potstill.distill import HISTORY, distill
from potstill.io import write_json, write_text
from potstill.recipes import load_recipe
from potstill.tasks.sentence_embedding import SentenceEmbedding, geometry

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POLARITY = SHARED / "text-classification" / "sentence_polarity"
EVAL_SIZE = 1000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WIKITEXT_JOINS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}


def polarity(folder: Path) -> list[str]:
    pos = (folder / "rt-polarity.pos").read_text(encoding="utf-8", errors="replace").splitlines()
    neg = (folder / "rt-polarity.neg").read_text(encoding="utf-8", errors="replace").splitlines()
    return [s.strip() for pair in zip(pos, neg, strict=True) for s in pair]  # interleaved: both classes held out


def sentences_of(text: str, min_words: int = 4) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if len(s.split()) >= min_words]


def wikitext_sentences(path: Path) -> list[str]:
    """A WikiText-2 split's paragraphs (headings dropped, ``@-@`` joins undone), as sentences."""
    out: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("="):
            for joined, plain in _WIKITEXT_JOINS.items():
                line = line.replace(joined, plain)
            out += sentences_of(line)
    return out


def extra_sentences(text_dir: Path) -> list[str]:
    """WikiText-2 validation paragraphs (headings dropped) and State of the Union addresses, as sentences."""
    out = wikitext_sentences(text_dir / "wikitext2-valid.txt")
    for path in sorted((text_dir / "state_union").glob("*.txt")):
        out += sentences_of(path.read_text(encoding="latin-1"))  # some files are Latin-1 (see the data README)
    return out


def augmented(sentences: list[str], copies: int, seed: int = 1) -> list[str]:
    """``copies`` perturbed versions of each sentence, cycling through three kinds: a contiguous crop
    of 40-90% of its words (sentences of 4 words or fewer are joined with another one instead), the
    sentence with 15% of its words dropped, and the sentence joined with another one. More in-domain
    inputs for the teacher to label (the held-out set is in-domain too)."""
    rng = random.Random(seed)
    out = []
    for sentence in sentences:
        words = sentence.split()
        for kind in range(copies):
            if kind % 3 == 0 and len(words) > 4:
                n = max(3, int(len(words) * rng.uniform(0.4, 0.9)))
                start = rng.randrange(0, len(words) - n + 1)
                out.append(" ".join(words[start:start + n]))
            elif kind % 3 == 1:
                out.append(" ".join([w for w in words if rng.random() > 0.15] or words))
            else:
                out.append(f"{sentence} {rng.choice(sentences)}")
    return out


def score(run_dir: Path, data: Path, text_dir: Path, count: int = EVAL_SIZE) -> dict[str, dict[str, float]]:
    """Geometry of ``run_dir``'s student against its teacher on held-out and on seen sentences."""
    task = SentenceEmbedding(load_recipe(run_dir / "recipe.yaml"), progress=False)
    held_out = set(task.eval_set)
    seen = [s for s in task.train_set if s not in held_out]
    in_domain, other = set(polarity(data)), set(extra_sentences(text_dir))
    samples = {"held out (polarity)": task.eval_set,
               "seen (polarity)": [s for s in seen if s in in_domain][:count],
               "seen (WikiText-2 / State of the Union)": [s for s in seen if s in other][:count]}
    teacher = task.build_model(task.recipe.teacher)
    student = task.load_model(run_dir / "student")
    return {name: {"sentences": len(sentences),
                   **geometry(task.embed(student, sentences)[0], task.embed(teacher, sentences)[0])}
            for name, sentences in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(POLARITY))
    parser.add_argument("--extra", default=str(SHARED / "text"),
                        help="folder with wikitext2-valid.txt and state_union/ ('' = polarity only)")
    parser.add_argument("--augment", type=int, default=3,
                        help="perturbed copies of each polarity training sentence added to the transfer set")
    parser.add_argument("--max-train", type=int, default=None, help="subsample the transfer set (exploration)")
    parser.add_argument("--in-domain", type=int, default=None, metavar="N",
                        help="keep only the first N training polarity sentences (a data-scaling curve)")
    parser.add_argument("--views", type=int, default=None, metavar="V",
                        help="cycle the transfer set, reshuffled each pass, to exactly V sentences: the same "
                             "step budget whatever its size (with train.epochs=1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override, e.g. --set train.epochs=1 (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--rows", choices=["all", "from-teacher", "random-init"], default="all",
                        help="which distilled students to train (run the two in parallel on a GPU)")
    parser.add_argument("--runs", default="runs/bench-minilm")
    parser.add_argument("--resume", action="store_true", help="continue runs killed part-way (their checkpoints)")
    parser.add_argument("--score", metavar="RUN_DIR", default=None,
                        help="train nothing: score RUN_DIR's student on held-out and on seen sentences")
    parser.add_argument("--out", default="benchmarks/results/minilm_distill.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.score:
        rows = score(Path(args.score), Path(args.data), Path(args.extra or SHARED / "text"))
        write_json(Path(args.out), {"run": args.score, "rows": rows})
        print("| sentences | count | cosine to teacher | Spearman | top-10 overlap |\n|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['sentences']} | {r['cosine_to_teacher']:.3f} | {r['spearman']:.3f} | "
                  f"{r['top10_overlap']:.3f} |")
        return

    labelled = polarity(Path(args.data))
    held_out = labelled[-EVAL_SIZE:]
    unseen = set(held_out)
    in_domain = [s for s in labelled[:-EVAL_SIZE] if s and s not in unseen][: args.in_domain]
    train = in_domain + (extra_sentences(Path(args.extra)) if args.extra else []) + augmented(in_domain, args.augment)
    train = [s for s in train if s and s not in unseen]
    random.Random(0).shuffle(train)
    train = train[: args.max_train] if args.max_train else train
    if args.views:
        passes = [random.Random(1 + n).sample(train, len(train)) for n in range(-(-args.views // len(train)))]
        train = [s for one_pass in passes for s in one_pass][: args.views]
    runs = Path(args.runs)
    # a fixed path (same content for the same arguments), so that --resume finds the same recipe
    transfer = runs / "transfer-set.txt"
    write_text(transfer, "\n".join(train + held_out) + "\n")  # the recipe holds out the last eval_size lines
    common = [f"data.files=[{transfer.resolve()}]", f"data.eval_size={EVAL_SIZE}", *args.set]
    recipe = load_recipe("minilm-distilbert-style", common)
    rows: dict[str, dict] = {}
    curve: list[float] = []
    if args.rows in ("all", "from-teacher"):
        from_teacher = distill(recipe, runs / "from-teacher", progress=False, overwrite=not args.resume)
        rows.update(from_teacher.metrics["models"])
        history = json.loads((from_teacher.run_dir / "student" / HISTORY).read_text())
        curve = [round(h["eval_spearman"], 4) for h in history if "eval_spearman" in h]
    if args.rows in ("all", "random-init"):
        random_init = distill(load_recipe("minilm-distilbert-style", [*common, "student.init=random"]),
                              runs / "random-init", progress=False, overwrite=not args.resume)
        rows.setdefault("teacher", random_init.metrics["models"]["teacher"])
        rows["random init, distilled"] = random_init.metrics["models"]["student"]
    teacher_speed = rows["teacher"]["sentences_per_second"]
    for row in rows.values():
        row["speedup"] = row["sentences_per_second"] / teacher_speed
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": device, "train_sentences": len(train), "in_domain": len(in_domain),
              "views": args.views, "augment": args.augment, "eval_sentences": EVAL_SIZE,
              "epochs": recipe.train.epochs, "overrides": args.set, "extra_data": bool(args.extra),
              "distillation": recipe.distillation.model_dump(),
              "student": recipe.student.model_dump(), "train": recipe.train.model_dump(), "rows": rows}
    if curve:
        result["eval_spearman_by_epoch"] = curve
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
