"""Whisper base -> 2 decoder layers (distil-whisper) on the real speech here, plus unlabelled synthetic speech.

    python benchmarks/whisper_distill.py --data ../shared/data/speech --text ../shared/data/text/state_union \\
        --work runs/whisper-bench --out benchmarks/results/whisper_distill.json

Training clips: LJ Speech chapter LJ001 without 40 held-out sentences, FSDD recordings with idx 5
(all six speakers, every digit), and ``--synthetic`` sentences of the State of the Union addresses read by
espeak-ng in eight voices, resampled to 16 kHz with sox — audio *without* transcripts: the
teacher's pseudo-labels are their only targets (distil-whisper's unlabelled-audio setting). Eval:
the 40 held-out LJ Speech sentences and FSDD idx 0 (all six speakers, every digit): real speech only.

Each run is ``potstill distill`` of the speech-recognition task (the recipe is written into its run
directory): the teacher's encoder outputs are computed once (shared by the runs on the same clips),
the teacher transcribes the training audio once, the student (encoder + decoder layers 0 and 5 of
base) learns from 0.55 KL (T = 2) + 0.45 CE on the pseudo-labels. Per-epoch WER on the eval set
gives the learning curve; the final comparison transcribes the eval set from the audio, encoder
included, timed. ``--seeds`` repeats the main configuration; ``--real-only`` adds a run without
the synthetic audio, ``--ce-only`` one on the pseudo-labels alone (alpha 0).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from potstill.distill import distill
from potstill.metrics import wer
from potstill.recipes import parse_recipe

VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3", "en-gb-scotland+f2", "en-029", "en-us-nyc+f4",
          "en-gb-x-gbcwmd+m5"]
HELD_OUT_LJ = 40


def sentences(text_dir: Path, low: int = 6, high: int = 28) -> list[str]:
    """Plain sentences of ``low``-``high`` words from every text file (Latin-1 where not UTF-8)."""
    out = []
    for path in sorted(text_dir.glob("*.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        for line in text.splitlines():
            for sentence in re.split(r"(?<=[.!?])\s+", line.strip()):
                words = sentence.split()
                if low <= len(words) <= high and re.fullmatch(r"[A-Za-z0-9 ,.;:'!?$%-]+", sentence) \
                        and "--" not in sentence and sentence[0].isupper():
                    out.append(sentence)
    return sorted(set(out))


def synthetic_speech(text_dir: Path, folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` sentences read by espeak-ng (voices and speeds varied), 16 kHz mono; a manifest
    with the audio and the sentence read (kept as ``spoken``, not given to the run). Reuses what exists."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        sys.exit("synthetic speech needs espeak-ng and sox: apt-get install -y espeak-ng sox")
    pool = sentences(text_dir)
    rng = random.Random(seed)
    chosen = rng.sample(pool, count)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, sentence in enumerate(chosen):
        voice, speed = VOICES[number % len(VOICES)], rng.randrange(140, 190)
        key = hashlib.sha256(f"{voice}|{speed}|{sentence}".encode()).hexdigest()[:10]
        wav = folder / f"syn-{number:04d}-{key}.wav"  # named by what it says: a file is reused only for it
        if not wav.is_file():
            raw = folder / f".raw-{number:04d}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), sentence], check=True)
            # peak at -1 dBFS: espeak's loudest samples would clip after resampling
            subprocess.run(["sox", "-q", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav), "gain", "-n", "-1"],
                           check=True)
            raw.unlink()
        lines.append(json.dumps({"audio": wav.name, "spoken": sentence, "voice": voice, "speed": speed}))
    manifest = folder / f"manifest-{count}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def held_out_lj(data: Path) -> list[str]:
    ids = [line.split("|")[0] for line in (data / "ljspeech" / "metadata.csv").read_text().splitlines() if line]
    return [ids[i * len(ids) // HELD_OUT_LJ + 2] for i in range(HELD_OUT_LJ)]


def recipe(args: argparse.Namespace, manifest: Path | None, seed: int, name: str, **distillation: Any) -> Any:
    data, held_out = args.data.resolve(), held_out_lj(args.data)
    train = [{"source": "ljspeech", "path": str(data / "ljspeech"), "exclude_ids": held_out},
             {"source": "fsdd", "path": str(data / "fsdd"), "fsdd_index": [5, 5 + args.fsdd_takes]}]
    if manifest is not None:
        train.append({"source": "manifest", "path": str(manifest.resolve()), "text_column": None,
                      "name": "synthetic"})
    clips = "real+synthetic" if manifest is not None else "real"
    return parse_recipe({
        "task": "speech-recognition",
        "data": {"train": train,
                 "eval": [{"source": "ljspeech", "path": str(data / "ljspeech"), "ids": held_out},
                          {"source": "fsdd", "path": str(data / "fsdd"), "fsdd_index": [0, 1]}],
                 "eval_batch_size": args.eval_batch_size},
        "teacher": {"model_name_or_path": "whisper-base"},
        "student": {"layers_from_teacher": "first-last"},
        "pseudo_labels": {"wer_threshold": 0.1, "batch_size": 16, "max_new_tokens": 128,
                          "path": str((args.work / f"pseudo-labels-{clips}.json").resolve())},
        "encoder_cache": {"path": str((args.work / f"encoder-cache-{clips}").resolve()), "batch_size": 4},
        "distillation": {"loss": "kl", "temperature": 2.0, "alpha": 0.55, **distillation},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                  "warmup_steps": 10, "max_grad_norm": 1.0, "checkpoint_every": 20, "seed": seed},
        "baseline": False,
        "output_dir": str((args.work / name).resolve()),
    })


def run(args: argparse.Namespace, manifest: Path | None, seed: int, name: str, **distillation: Any) -> dict[str, Any]:
    start = time.perf_counter()
    result = distill(recipe(args, manifest, seed, name, **distillation), progress=False)
    metrics = result.metrics
    history = json.loads((result.run_dir / "student" / "history.json").read_text())
    curve = [{k: row[k] for k in row if k in ("epoch", "step") or k.startswith("eval_wer")}
             for row in history if "eval_wer" in row]
    return {"name": name, "seed": seed, "distillation": metrics["distillation"], "models": metrics["models"],
            "pseudo_labels": metrics["pseudo_labels"], "curve": curve, "wall_s": time.perf_counter() - start,
            "transcripts": metrics["transcripts"], "references": metrics["references"],
            "eval_ids": metrics["eval_ids"]}


def synthetic_check(manifest: Path, pseudo_labels: Path) -> dict[str, Any]:
    """How well the teacher hears the synthetic speech: its pseudo-labels against the sentences espeak read."""
    spoken = [json.loads(line)["spoken"] for line in manifest.read_text().splitlines() if line]
    saved = json.loads(pseudo_labels.read_text())["clips"]
    offset = len(saved) - len(spoken)  # the synthetic clips come last in the training list
    heard = [saved[str(offset + i)]["text"] for i in range(len(spoken))]
    return {"clips": len(spoken), "teacher_wer_vs_spoken_text": wer(spoken, heard),
            "examples": [{"spoken": s, "heard": h} for s, h in list(zip(spoken, heard, strict=True))[:8]]}


# decoder shapes of the larger Whispers (their published configs); the encoder is irrelevant to the decoder's speed
WHISPER_SIZES = {"small": (768, 12, 12, 3072), "medium": (1024, 24, 16, 4096), "large-v2": (1280, 32, 20, 5120)}


def time_decoder(model: torch.nn.Module, hidden: torch.Tensor, prompt: list[int], tokens: int) -> dict[str, float]:
    """CPU seconds of this process of a greedy decoder's first step (the prompt, and every layer's cross-attention
    keys and values of the encoder frames) and of each later token, at batch 1, averaged over the clips."""
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    first = later = 0.0
    for row in range(len(hidden)):
        h = hidden[row:row + 1]
        model(encoder_outputs=(h,), decoder_input_ids=torch.tensor([prompt]))  # warm
        start = time.process_time()
        step = model(encoder_outputs=(h,), decoder_input_ids=torch.tensor([prompt]), use_cache=True)
        first += time.process_time() - start
        cache, token = getattr(step, "cache", None) or step.past_key_values, torch.tensor([[prompt[-1]]])
        start = time.process_time()
        for _ in range(tokens):
            step = model(encoder_outputs=(h,), decoder_input_ids=token, use_cache=True, **{cache_name: cache})
            cache, token = getattr(step, "cache", None) or step.past_key_values, step.logits[:, -1:].argmax(-1)
        later += time.process_time() - start
    return {"first_step_s": first / len(hidden), "per_token_s": later / (len(hidden) * tokens)}


def projected(teacher: dict[str, float], student: dict[str, float]) -> dict[str, float]:
    """Decoder speed-up for a transcript of n tokens, from the first-step and per-token costs."""
    return {str(n): (teacher["first_step_s"] + n * teacher["per_token_s"])
            / (student["first_step_s"] + n * student["per_token_s"]) for n in (3, 10, 20, 40, 100)}


def decoder_costs(data: Path, clips: int = 4, tokens: int = 24) -> dict[str, Any]:
    """Where a greedy decoder's time goes, teacher against its first-last 2-layer student: whisper-base on real
    clips, and config-built (random-weight) small, medium and large-v2 decoders on random encoder frames —
    the time of a forward pass depends on the shapes, not the weights. The 51,865-way output projection is
    paid per token at every size; it is what bounds base's speed-up."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from potstill.audio import load_audio
    from potstill.data.speech import whisper_prompt_ids
    from potstill.pretrained import load_processor, load_whisper
    from potstill.students import make_student
    from potstill.tasks.transcription import encode

    teacher = load_whisper("whisper-base").eval()
    processor = load_processor("whisper-base")
    paths = [data / "ljspeech" / "wavs" / f"{i}.flac" for i in held_out_lj(data)[:clips]]
    features = processor.feature_extractor([load_audio(p) for p in paths], sampling_rate=16000,
                                           return_tensors="pt").input_features
    prompt = whisper_prompt_ids(processor.tokenizer, language="en")
    out: dict[str, Any] = {"clips": clips, "forced_tokens": tokens, "sizes": {}}
    with torch.no_grad():
        models = {"base": (teacher, encode(teacher, features))}
        for size, (width, layers, heads, ffn) in WHISPER_SIZES.items():
            config = WhisperConfig(vocab_size=teacher.config.vocab_size, d_model=width, decoder_layers=layers,
                                   decoder_attention_heads=heads, decoder_ffn_dim=ffn, encoder_layers=1,
                                   encoder_attention_heads=heads, encoder_ffn_dim=ffn,
                                   decoder_start_token_id=teacher.config.decoder_start_token_id)
            models[size] = (WhisperForConditionalGeneration(config).eval(),
                            torch.randn(clips, 1500, width, generator=torch.Generator().manual_seed(0)))
        for size, (model, hidden) in models.items():
            student = make_student(model, {"decoder": "first-last"}).eval()
            row = {"teacher": time_decoder(model, hidden, prompt, tokens),
                   "student": time_decoder(student, hidden, prompt, tokens), "d_model": model.config.d_model,
                   "decoder_layers": model.config.decoder_layers}
            head = model.proj_out.weight
            x = torch.randn(1, 1, head.shape[1])
            start = time.process_time()
            for _ in range(50):
                torch.nn.functional.linear(x, head)
            row["output_projection_per_token_s"] = (time.process_time() - start) / 50
            row["projected_speedup"] = projected(row["teacher"], row["student"])
            out["sizes"][size] = row
            print(f"decoder costs {size}: per token teacher {row['teacher']['per_token_s'] * 1e3:.1f} ms, student "
                  f"{row['student']['per_token_s'] * 1e3:.1f} ms, speed-up at 20 tokens "
                  f"{row['projected_speedup']['20']:.2f}", flush=True)
            del student
    return out


def gap_closed(models: dict[str, Any], key: str) -> float:
    teacher, cut, student = (models[n][key] for n in ("teacher", "cut, not distilled", "student"))
    return (cut - student) / (cut - teacher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/speech"))
    parser.add_argument("--text", type=Path, default=Path("../shared/data/text/state_union"))
    parser.add_argument("--work", type=Path, default=Path("runs/whisper-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/whisper_distill.json"))
    parser.add_argument("--synthetic", type=int, default=200, help="synthetic sentences (0: none)")
    parser.add_argument("--fsdd-takes", type=int, default=1, help="FSDD training takes per speaker and digit (idx 5..)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--real-only", action="store_true", help="also distil without the synthetic audio (seed 0)")
    parser.add_argument("--speed-breakdown", action="store_true",
                        help="also time the decoders' first step and later tokens apart (teacher vs student)")
    parser.add_argument("--ce-only", action="store_true",
                        help="also train on the pseudo-labels alone (alpha 0, seed 0)")
    args = parser.parse_args()
    for folder in (args.data / "ljspeech", args.data / "fsdd", args.text):
        if not folder.is_dir():
            sys.exit(f"{folder} does not exist: give --data (LJ Speech and FSDD) and --text (the sentences to read)")
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = synthetic_speech(args.text, args.work / "synthetic", args.synthetic) if args.synthetic else None
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "args": {k: str(v) for k, v in
                                                                                vars(args).items()}, "runs": []}
    if args.out.is_file():  # finished runs are kept: a rerun adds what is missing
        saved = json.loads(args.out.read_text())
        result.update({k: saved[k] for k in ("runs", "decoder_costs", "synthetic") if k in saved})
    done = {r["name"] for r in result["runs"]}
    plan = [(manifest, seed, f"distil-seed{seed}", {}) for seed in args.seeds]
    if args.real_only:
        plan.append((None, 0, "real-only-seed0", {}))
    if args.ce_only:
        plan.append((manifest, 0, "ce-only-seed0", {"alpha": 0.0}))
    if args.speed_breakdown and "sizes" not in result.get("decoder_costs", {}):
        result["decoder_costs"] = decoder_costs(args.data)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    for clips, seed, name, distillation in plan:
        if name in done:
            continue
        print(f"--- {name}", flush=True)
        result["runs"].append(run(args, clips, seed, name, **distillation))
        if manifest is not None:
            result["synthetic"] = synthetic_check(manifest, args.work / "pseudo-labels-real+synthetic.json")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    summarize(result)


def summarize(result: dict[str, Any]) -> None:
    for size, row in result.get("decoder_costs", {}).get("sizes", {}).items():
        print(f"decoder {size:9s} per token: teacher {row['teacher']['per_token_s'] * 1e3:6.1f} ms, student "
              f"{row['student']['per_token_s'] * 1e3:6.1f} ms, output projection "
              f"{row['output_projection_per_token_s'] * 1e3:5.1f} ms; speed-up at 20 tokens "
              f"{row['projected_speedup']['20']:.2f}")
    print(f"{'run':22s} {'model':20s} {'WER LJ':>7s} {'WER FSDD':>8s} {'tok/s':>7s} {'speedup':>7s} {'RTF':>6s} "
          f"{'gap closed (LJ)':>15s}")
    for r in result["runs"]:
        for name, m in r["models"].items():
            closed = f"{gap_closed(r['models'], 'wer_ljspeech'):.2f}" if name == "student" else ""
            print(f"{r['name']:22s} {name:20s} {m['wer_ljspeech']:7.3f} {m['wer_fsdd']:8.3f} "
                  f"{m['decoder_tokens_per_second']:7.1f} {m['decoder_speedup']:7.2f} {m['real_time_factor']:6.3f} "
                  f"{closed:>15s}")


if __name__ == "__main__":
    main()
