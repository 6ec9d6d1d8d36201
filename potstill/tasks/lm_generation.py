"""Generated completions: on-policy distillation (GKD) and sequence-level KD.

- **On-policy** (Agarwal et al. 2024, GKD): with probability λ a batch's completions are
  replaced by the student's own samples, and the teacher scores those; the student learns
  where it actually goes, not only where the data goes.
- **Sequence-level** (Kim & Rush 2016): the teacher writes the completions once, before
  training, and the student trains on them. It works across tokenizers (the exchange is text).

A pair's prompt is its prompt; plain text has none, so the first ``prompt_fraction`` of each
chunk serves as the prompt, and the whole generated sequence is trained (the prefix is real
text, the rest is the model's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..losses import IGNORE_INDEX
from ..models import evaluating
from ..progress import progress as bar
from .base import Batch
from .lm_data import Source, collate, encode


def generate(model: nn.Module, prompts: list[Tensor], max_new_tokens: list[int], *, temperature: float,
             eos_token_id: int | None, seed: int) -> list[Tensor]:
    """Sample a continuation of each prompt (temperature 0: greedy), cut after EOS or its budget."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    # left padding: every prompt ends where generation starts
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        attention[row, width - len(prompt):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), evaluating(model):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max(max_new_tokens), pad_token_id=eos_token_id if eos_token_id
                             is not None else 0, eos_token_id=eos_token_id, **sampling)
    completions = []
    for row, budget in enumerate(max_new_tokens):
        new = out[row, width:width + budget].cpu()
        if eos_token_id is not None and (new == eos_token_id).any():
            new = new[: int((new == eos_token_id).nonzero()[0]) + 1]
        completions.append(new)
    return completions


def split_prompt(ids: Tensor, labels: Tensor, prompt_fraction: float) -> tuple[Tensor, int]:
    """A sequence's prompt and how many tokens follow it (``ids`` and ``labels`` unpadded).

    With labels on every position (plain text) the prompt is the first ``prompt_fraction``.
    """
    full = torch.cat([ids, labels[-1:]])
    valid = (labels != IGNORE_INDEX).nonzero()
    first = int(valid[0]) if len(valid) else len(labels)
    length = first + 1 if first > 0 else max(1, round(len(full) * prompt_fraction))
    return full[:length], len(full) - length


class OnPolicy:
    """``rollout(student, batch, key)`` for the engine: with probability ``fraction`` the batch's
    completions become the student's samples (same tokenizer for teacher and student)."""

    def __init__(self, fraction: float, *, temperature: float, prompt_fraction: float, max_new_tokens: int | None,
                 eos_token_id: int | None, seed: int):
        self.fraction, self.temperature, self.prompt_fraction = fraction, temperature, prompt_fraction
        self.max_new_tokens, self.eos_token_id, self.seed = max_new_tokens, eos_token_id, seed

    def __call__(self, student: nn.Module, batch: Batch, key: int) -> Batch:
        draw = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + key))
        if draw.item() >= self.fraction:
            return batch
        prompts, budgets, plain = [], [], []
        for ids, labels, attention in zip(batch.student_inputs["input_ids"].cpu(), batch.labels.cpu(),
                                          batch.student_inputs["attention_mask"].cpu(), strict=True):
            n = int(attention.sum())
            prompt, rest = split_prompt(ids[:n], labels[:n], self.prompt_fraction)
            is_plain = bool(labels[0] != IGNORE_INDEX)
            prompts.append(prompt)
            budgets.append(rest if is_plain or self.max_new_tokens is None else self.max_new_tokens)
            plain.append(is_plain)
        completions = generate(student, prompts, budgets, temperature=self.temperature,
                               eos_token_id=self.eos_token_id, seed=self.seed * 1_000_003 + key)
        examples = [{"ids": torch.cat([p, c]), "prompt_length": 0 if is_plain else len(p)}
                    for p, c, is_plain in zip(prompts, completions, plain, strict=True)]
        return collate(examples).to(batch.labels.device)


def teacher_generations(teacher: nn.Module, tokenizer: Any, sources: list[Source], *, max_length: int,
                        temperature: float, prompt_fraction: float, max_new_tokens: int | None, seed: int,
                        batch_size: int = 16, progress: bool = True) -> list[Source]:
    """Sequence-level KD: each source with its completion written by the teacher (``tokenizer``
    is the teacher's; sources longer than ``max_length`` tokens are cut). The result is text,
    for any student tokenizer."""
    out: list[Source] = []
    for start in bar(range(0, len(sources), batch_size), desc="teacher writing completions",
                     enabled=progress, leave=False):
        chunk = sources[start:start + batch_size]
        prompts, budgets = [], []
        for source in chunk:
            encoded = encode(tokenizer, source)
            ids, prompt_length = torch.tensor(encoded.ids[:max_length]), encoded.prompt_length
            if prompt_length:
                prompts.append(ids[:prompt_length])
                budgets.append(max_new_tokens or max(1, len(ids) - prompt_length))
            else:
                cut = max(1, round(len(ids) * prompt_fraction))
                prompts.append(ids[:cut])
                budgets.append(max(1, len(ids) - cut))
        completions = generate(teacher, prompts, budgets, temperature=temperature,
                               eos_token_id=tokenizer.eos_token_id, seed=seed + start)
        for (prompt, _), prompt_ids, completion in zip(chunk, prompts, completions, strict=True):
            if prompt:
                out.append((prompt, tokenizer.decode(completion, skip_special_tokens=True)))
            else:  # plain text stays plain: the real prefix and the teacher's continuation, all trained
                out.append(("", tokenizer.decode(torch.cat([prompt_ids, completion]), skip_special_tokens=True)))
    return out
