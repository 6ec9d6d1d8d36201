"""The offline Whisper teachers: conversion time, and transcripts of the vendored clips against their references.

    python benchmarks/whisper_teachers.py --out benchmarks/results/whisper_teachers.json

Converts ``whisper-tiny.en`` and ``whisper-base`` from their PyPI packages into a fresh cache
(timed), then transcribes the six LJ Speech sentences and the ten FSDD digits that ship with
potstill (greedy, English). With the ``ctranslate2`` package importable (it is not a potstill
dependency) each transcript is also compared with CTranslate2 running the original files: the
same tokens, and the largest difference between the two models' logits along the way.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from potstill import pretrained
from potstill.audio import load_audio

SPEECH = Path(pretrained.__file__).parent / "data" / "speech"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def clips() -> list[tuple[str, Path, str]]:
    out = []
    with open(SPEECH / "ljspeech" / "metadata.csv", newline="") as f:
        for row in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE):
            out.append((row[0], SPEECH / "ljspeech" / "wavs" / f"{row[0]}.flac", row[2]))
    for path in sorted((SPEECH / "fsdd" / "recordings").glob("*.wav")):
        out.append((path.stem, path, DIGITS[int(path.name[0])]))
    return out


def words(text: str) -> list[str]:
    """Lower case, no punctuation, digits spelled out (a digit clip may come back as "0")."""
    text = re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text.lower())
    return re.sub(r"[^a-z' ]", " ", text).split()


def edits(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@cache
def ct2_model(name: str) -> Any:
    import ctranslate2

    folder, files, _ = pretrained.ct2_whisper_files(name)
    if len(files) > 1:  # CTranslate2 reads one model.bin: join the parts in a scratch folder
        scratch = Path(tempfile.mkdtemp())
        with open(scratch / "model.bin", "wb") as out:
            for part in files:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copy(folder / extra, scratch / extra)
        folder = scratch
    return ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")


def ct2_check(name: str, features: np.ndarray, prompt: list[int], logits_fn: Any) -> dict[str, Any] | None:
    try:
        import ctranslate2
    except ImportError:
        return None
    model = ct2_model(name)
    view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32))
    result = model.generate(view, [prompt], beam_size=1, return_logits_vocab=True)[0]
    ids = result.sequences_ids[0]
    theirs = np.stack([np.asarray(step).reshape(-1) for step in result.logits[0]])[: len(ids) + 1]
    ours = logits_fn(prompt + ids)[: theirs.shape[0]]
    finite = np.isfinite(theirs) & (np.abs(theirs) < 1e30)  # CTranslate2 reports suppressed tokens as -inf
    return {"ids": ids, "max_abs_logit_diff": float(np.abs(theirs - ours)[finite].max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/whisper_teachers.json")
    args = parser.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="potstill-cache-")
    os.environ["POTSTILL_CACHE"] = cache_dir
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
                              "models": {}}
    items = clips()
    # the Whisper classes are imported before the clock starts: the conversion time is the conversion's
    _ = transformers.WhisperForConditionalGeneration, transformers.WhisperProcessor
    for name in (pretrained.WHISPER_TINY_EN, pretrained.WHISPER_BASE):
        start = time.perf_counter()
        source = pretrained.resolve(name)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        pretrained.resolve(name)
        cached_s = time.perf_counter() - start
        start = time.perf_counter()
        model = pretrained.load_whisper(source).eval()
        processor = pretrained.load_processor(source)
        load_s = time.perf_counter() - start
        rows, errors, total = [], {"ljspeech": 0, "fsdd": 0}, {"ljspeech": 0, "fsdd": 0}
        for clip_id, path, reference in items:
            features = processor.feature_extractor(load_audio(path, 16000), sampling_rate=16000,
                                                   return_tensors="pt").input_features
            start = time.perf_counter()
            with torch.no_grad():
                ids = model.generate(features)
            seconds = time.perf_counter() - start
            text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
            corpus = "fsdd" if "_" in clip_id else "ljspeech"
            n_edits = edits(words(reference), words(text))
            errors[corpus] += n_edits
            total[corpus] += len(words(reference))
            row = {"clip": clip_id, "reference": reference, "transcript": text, "word_edits": n_edits,
                   "generate_s": round(seconds, 3)}
            prompt = model._retrieve_init_tokens(features, 1, model.generation_config, model.config, 3000, {})
            prompt = prompt[0].tolist()

            def logits(decoder_ids: list[int], model=model, features=features, prompt=prompt) -> np.ndarray:
                with torch.no_grad():
                    out = model(input_features=features, decoder_input_ids=torch.tensor([decoder_ids])).logits
                return out[0, len(prompt) - 1:].numpy()

            check = ct2_check(name, features.numpy(), prompt, logits)
            if check is not None:
                ours = [t for t in ids[0].tolist() if t not in prompt and t != model.generation_config.eos_token_id]
                theirs = [t for t in check["ids"] if t != model.generation_config.eos_token_id]
                row["ctranslate2_same_tokens"] = ours == theirs
                row["ctranslate2_max_abs_logit_diff"] = check["max_abs_logit_diff"]
            rows.append(row)
        result["models"][name] = {
            "convert_s": round(convert_s, 2), "cached_resolve_s": round(cached_s, 4), "load_s": round(load_s, 2),
            "wer": {k: errors[k] / total[k] for k in errors}, "clips": rows}
    shutil.rmtree(cache_dir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    names = list(result["models"])
    print(f"{'':12s}" + "".join(f"{n:>18s}" for n in names))
    for key in ("convert_s", "cached_resolve_s", "load_s"):
        print(f"{key:12s}" + "".join(f"{result['models'][n][key]:>18}" for n in names))
    for corpus in ("ljspeech", "fsdd"):
        print(f"WER {corpus:8s}" + "".join(f"{result['models'][n]['wer'][corpus]:>18.3f}" for n in names))
    print()
    for i, (clip_id, _, reference) in enumerate(items):
        print(f"{clip_id:12s} {reference!r}")
        for n in names:
            row = result["models"][n]["clips"][i]
            ct2 = row.get("ctranslate2_max_abs_logit_diff")
            extra = f"  [CTranslate2: same tokens {row['ctranslate2_same_tokens']}, max |Δlogit| {ct2:.1e}]" \
                if ct2 is not None else ""
            print(f"{'':12s}   {n:16s} {row['transcript']!r}{extra}")


if __name__ == "__main__":
    main()
