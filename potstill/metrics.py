"""Metrics on predictions: accuracy, teacher–student agreement, held-out KL, word error rate."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from .losses import kl_divergence


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose arg-max class is the label."""
    return (logits.argmax(-1) == labels).float().mean().item()


def macro_f1(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """The mean over classes of F1 = 2·precision·recall / (precision + recall) of the arg-max class.

    Classes that appear neither among the labels nor among the predictions do not count; a class
    that appears on one side only scores 0. Unlike accuracy, a model that ignores a rare class
    is penalised for it.
    """
    predicted = logits.argmax(-1)
    classes = int(max(num_classes or 0, labels.max().item() + 1, predicted.max().item() + 1))
    scores = []
    for c in range(classes):
        true, guess = labels == c, predicted == c
        if not (true.any() or guess.any()):
            continue
        hits = (true & guess).sum().item()
        scores.append(2 * hits / (true.sum().item() + guess.sum().item()))
    return sum(scores) / len(scores)


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Fraction of examples on which the student's top-1 class equals the teacher's."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def held_out_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> float:
    """Mean KL(p_teacher ‖ p_student) per example at ``temperature`` (not scaled by T²)."""
    return kl_divergence(student_logits, teacher_logits, temperature=temperature).item() / temperature**2


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Accuracy within each true class (NaN for a class absent from ``labels``)."""
    hits = (logits.argmax(-1) == labels).float()
    return [hits[labels == c].mean().item() if (labels == c).any() else float("nan")
            for c in range(num_classes)]


#: Whisper's British → American spelling table (openai/whisper, MIT; see data/text/ATTRIBUTION.md)
_SPELLING = Path(__file__).parent / "data" / "text" / "whisper-english-spelling.json"


@functools.cache
def _english_normalizer():  # type: ignore[no-untyped-def]
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(json.loads(_SPELLING.read_text(encoding="utf-8")))


def normalize_english(text: str) -> str:
    """Whisper's English text normaliser, as Whisper's WERs are scored.

    Lower case; punctuation and bracketed/filler words ("uh", "um", "hmm") removed; contractions
    expanded ("won't" → "will not"); numbers written as digits ("twenty-five dollars" → "$25");
    British spellings made American ("colour" → "color"); whitespace collapsed. This is
    ``transformers``' port of it, with the spelling table vendored from openai/whisper.
    """
    return _english_normalizer()(text)


def wer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> float:
    """Corpus word error rate: (substitutions + deletions + insertions) / reference words, over all pairs.

    With ``normalize`` both sides go through :func:`normalize_english` first (as Whisper's WERs
    are reported); without it words are compared as written (split on whitespace). A reference
    that is empty (after normalising) still counts its hypothesis's words as insertions.
    """
    import jiwer

    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("wer takes sequences of transcripts, not one string")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if normalize:
        references = [normalize_english(r) for r in references]
        hypotheses = [normalize_english(h) for h in hypotheses]
    if not any(r.split() for r in references):
        raise ValueError("the references hold no words" + (" after normalising" if normalize else ""))
    out = jiwer.process_words(list(references), list(hypotheses))
    return (out.substitutions + out.deletions + out.insertions) / (out.substitutions + out.deletions + out.hits)


__all__ = ["accuracy", "agreement", "held_out_kl", "macro_f1", "normalize_english", "per_class_accuracy", "wer"]
