"""Cross-modal distillation (DiVA) with real parts: the Whisper base encoder + a connector + the frozen
SmolLM2-135M-Instruct, taught by SmolLM2 reading the transcripts (issue #19's evaluation).

Data (``--data``, default ``../shared/data/speech``):

- train: LJ Speech chapter LJ001 but the held-out sentences (every fifth), FSDD recordings of five
  speakers (``--fsdd-train-index``), and ``--synthetic`` espeak-ng sentences from the sentence-polarity
  sample that ships with potstill (several voices, speeds and pitches);
- held out (real speech): the held-out LJ Speech sentences and FSDD speaker ``--held-out-speaker``
  (indices 0-4, the usual test split);
- spoken prompts, answered side by side: a few espeak-ng questions no model trains on.

The run is ``potstill distill diva`` with these sets (the recipe below); the report compares the
trained connector with the untrained one and with the cascade (Whisper base transcribes, SmolLM2
reads) on held-out next-token KL and top-1 agreement with the teacher, and the curve of held-out KL
against optimiser steps, with a projection of the steps the targets need when they are not met.

    apt-get install -y espeak-ng sox
    python benchmarks/diva_distill.py --out benchmarks/results/diva_distill.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from potstill.data import VENDORED_SENTENCES
from potstill.distill import distill
from potstill.io import atomic_path, write_json, write_text
from potstill.recipes import load_recipe

#: ../shared/data/speech from the project root (or from any folder above it, for a git worktree)
DATA = next((p / "shared" / "data" / "speech" for p in Path(__file__).resolve().parents[1:]
             if (p / "shared" / "data" / "speech").is_dir()), Path("../shared/data/speech"))
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+m3", "+f2", "+f4", "+m7"]
QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "Can you name three colors?",
    "What do bees make?",
    "Why is the sky blue?",
    "What is two plus two?",
]
SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]


def detokenize(line: str) -> str:
    """A sentence-polarity line ("it's a charming , often affecting journey . ") as written text."""
    text = re.sub(r"\s+([,.!?;:)])", r"\1", line.strip())
    text = re.sub(r"\(\s+", "(", text).replace(' " ', ' "').replace(" n't", "n't").replace(" 's", "'s")
    text = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', text)
    return text[:1].upper() + text[1:]


def speak(text: str, path: Path, voice: str, speed: int, pitch: int) -> None:
    """espeak-ng → 16 kHz mono 16-bit WAV (written whole or not at all)."""
    with atomic_path(path) as tmp:
        raw = tmp.with_suffix(".raw.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
                       check=True, capture_output=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(tmp)], check=True,
                       capture_output=True)
        raw.unlink()


def synthesize(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """Spoken sentences for training and spoken questions for the answers; JSON-lines manifests."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise SystemExit("needs espeak-ng and sox: apt-get install -y espeak-ng sox")
    lines = [detokenize(line) for line in VENDORED_SENTENCES.read_text().splitlines()]
    lines = [t for t in lines if 5 <= len(t.split()) <= 22 and '"' not in t]
    rng = random.Random(seed)
    rng.shuffle(lines)
    manifests = {}
    for name, texts in (("train", lines[:count]), ("questions", QUESTIONS)):
        entries = []
        for i, text in enumerate(texts):
            voice = "en-us" if name == "questions" else rng.choice(VOICES) + rng.choice(VARIANTS)
            speed, pitch = (160, 50) if name == "questions" else (rng.randint(140, 190), rng.randint(30, 70))
            wav = folder / name / f"{i:04d}.wav"
            if not wav.is_file():
                speak(text, wav, voice, speed, pitch)
            entries.append({"audio": f"{name}/{wav.name}", "text": text, "id": f"espeak-{name}-{i:04d}",
                            "voice": voice})
        manifests[name] = folder / f"{name}.jsonl"
        write_text(manifests[name], "".join(json.dumps(e) + "\n" for e in entries))
    return manifests["train"], manifests["questions"]


def lj_ids(data: Path) -> list[str]:
    return [line.split("|", 1)[0] for line in (data / "ljspeech" / "metadata.csv").read_text().splitlines() if line]


def overrides(args: argparse.Namespace, train_manifest: Path | None, questions: Path) -> list[str]:
    ids = lj_ids(args.data)
    held_out = ids[4::5]
    train_speakers = [s for s in SPEAKERS if s != args.held_out_speaker]
    train = [{"source": "ljspeech", "path": str(args.data / "ljspeech"), "exclude_ids": held_out},
             {"source": "fsdd", "path": str(args.data / "fsdd"), "fsdd_speakers": train_speakers,
              "fsdd_index": list(args.fsdd_train_index)}]
    if train_manifest is not None:
        train.append({"source": "manifest", "path": str(train_manifest), "id_column": "id"})
    evaluation = [{"source": "ljspeech", "path": str(args.data / "ljspeech"), "ids": held_out},
                  {"source": "fsdd", "path": str(args.data / "fsdd"), "fsdd_speakers": [args.held_out_speaker],
                   "fsdd_index": [0, 5]}]
    spoken = [{"source": "manifest", "path": str(questions), "id_column": "id"}]
    return [f"data.train={json.dumps(train)}", f"data.eval={json.dumps(evaluation)}",
            f"data.spoken_prompts={json.dumps(spoken)}", f"data.encoder_cache={args.work / 'encoder-cache'}",
            f"data.answers={args.answers}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
            f"train.learning_rate={args.lr}", f"train.warmup_steps={args.warmup}",
            f"student.num_queries={args.queries}", f"distillation.kl={args.kl}",
            f"output_dir={args.work / args.run}", *args.set]


def curve(run: Path, metrics: dict[str, Any]) -> list[dict[str, float]]:
    """Held-out KL and agreement after each epoch (step 0: the untrained connector)."""
    history = json.loads((run / "student" / "history.json").read_text())
    start = metrics["models"]["untrained connector"]
    points = [{"step": 0, "kl_first": start["kl_first"], "agreement_first": start["agreement_first"],
               "kl_response": start["kl_response"], "hidden_l2": start["hidden_l2"]}]
    for row in history:
        if "eval_kl_first" in row:
            points.append({"step": row["step"], "kl_first": row["eval_kl_first"],
                           "agreement_first": row["eval_agreement_first"], "kl_response": row["eval_kl_response"],
                           "hidden_l2": row["eval_hidden_l2"], "seconds": row["seconds"]})
    return points


def by_set(metrics: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """First-token KL, agreement and L2 per held-out set: LJ Speech sentences, the held-out FSDD speaker."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    ids = metrics["eval_ids"]
    for name, clips in metrics["per_clip"].items():
        for subset, keep in (("ljspeech", lambda i: i.startswith("LJ")), ("fsdd", lambda i: not i.startswith("LJ"))):
            rows = [c for i, c in zip(ids, clips, strict=True) if keep(i)]
            if rows:
                n = len(rows)
                out.setdefault(subset, {})[name] = {"clips": n, "hidden_l2": sum(r[0] for r in rows) / n,
                                                    "kl_first": sum(r[1] for r in rows) / n,
                                                    "agreement_first": sum(r[2] for r in rows) / n}
    return out


def projection(points: list[dict[str, float]], target: float) -> dict[str, Any]:
    """Steps at which held-out KL reaches ``target``, from a power law KL ∝ step^-a fitted to the last
    half of the curve (log-log least squares); None when the curve does not fall."""
    tail = [p for p in points if p["step"] > 0][-max(2, len(points) // 2):]
    if len(tail) < 2:
        return {"steps": None, "fit": None}
    xs, ys = [math.log(p["step"]) for p in tail], [math.log(max(p["kl_first"], 1e-9)) for p in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    if slope >= 0:
        return {"steps": None, "fit": {"exponent": slope}}
    steps = math.exp(mx + (math.log(target) - my) / slope)
    return {"steps": round(steps), "fit": {"exponent": slope, "points": len(tail)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=Path("runs/diva-bench"))
    parser.add_argument("--run", default="run")
    parser.add_argument("--synthetic", type=int, default=300, help="espeak-ng training sentences (0: none)")
    parser.add_argument("--held-out-speaker", default="theo", choices=SPEAKERS)
    parser.add_argument("--fsdd-train-index", type=int, nargs=2, default=(5, 9))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--kl", type=float, default=0.0, help="weight of the KL term (0: DiVA's L2 only)")
    parser.add_argument("--answers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="more recipe overrides")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diva_distill.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_manifest, questions = synthesize(args.work / "espeak", args.synthetic)
    recipe = load_recipe("diva", overrides(args, train_manifest if args.synthetic else None, questions))
    result = distill(recipe, progress=False)
    seconds = time.perf_counter() - started
    metrics = result.metrics
    run = Path(recipe.output_dir)
    points = curve(run, metrics)
    models = metrics["models"]
    untrained, student = models["untrained connector"], models["student"]
    target_kl = 0.2 * untrained["kl_first"]
    out = {
        "command": "python benchmarks/diva_distill.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
        "recipe": json.loads(json.dumps(recipe.model_dump(mode="json"))),
        "seconds": seconds, "threads": args.threads, "eval_clips": metrics["eval_clips"],
        "train_clips": metrics["train_clips"],
        "models": models, "kl_reduction": metrics.get("kl_reduction"),
        "targets": {"kl_reduction_at_least": 0.8, "agreement_first_at_least": 0.7,
                    "kl_reduction_met": (metrics.get("kl_reduction") or {}).get("kl_first", 0) >= 0.8,
                    "agreement_met": student["agreement_first"] >= 0.7},
        "by_set": by_set(metrics), "curve": points,
        "projection_to_80pct_kl_reduction": projection(points, target_kl),
        "answers": metrics["answers"],
    }
    write_json(args.out, out)
    print(result.table())
    print(json.dumps({k: out[k] for k in ("kl_reduction", "targets", "by_set", "curve",
                                          "projection_to_80pct_kl_reduction")},
                     indent=1))
    for row in metrics["answers"]:
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
