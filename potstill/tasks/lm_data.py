"""Token sequences for causal-LM distillation.

Every example starts as text: a *source* ``(prompt, completion)``. Plain text is cut into
chunks with an empty prompt (every position is trained); prompt/completion pairs train only
the completion (the prompt goes through the tokenizer's chat template when it has one). Each
source is encoded by the student's tokenizer and, when the teacher's differs, by the teacher's
too, with an *alignment*: for each student position, the teacher position it is compared with.

- ``position`` (the ULD paper's): the k-th completion token of the student with the k-th of
  the teacher, as far as the shorter one goes;
- ``offsets`` (ours): positions at which both models have read exactly the same text (their
  last tokens end at the same byte), so both predict what comes next from the same context;
  positions without such a partner are left out.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..losses import IGNORE_INDEX
from .base import Batch

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"

#: a prompt (str, or chat messages) and the completion text; plain text has an empty prompt
Source = tuple[str | list[dict[str, str]], str]


def spread(items: list[Any], count: int | None) -> list[Any]:
    """``count`` items evenly spaced over the list (every file contributes), or all of them."""
    if count is None or count >= len(items):
        return items
    return [items[i * len(items) // count] for i in range(count)]


def read_pairs(path: str | Path) -> list[Source]:
    """JSON lines of ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}`` (the last
    message is the completion); a bad line names the file and line number."""
    sources: list[Source] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "messages" in record:
                *prompt, last = record["messages"]
                sources.append((prompt, last["content"]))
            else:
                sources.append((record["prompt"], record["completion"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: expected a JSON object with prompt and completion "
                             f"(or messages): {exc}") from None
    if not sources:
        raise ValueError(f"{path}: no prompt/completion pairs")
    return sources


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def token_byte_lengths(tokenizer) -> Tensor:
    """UTF-8 bytes each token id stands for (for bits per byte and byte offsets)."""
    from tokenizers import decoders

    byte_level = isinstance(getattr(tokenizer.backend_tokenizer, "decoder", None), decoders.ByteLevel)
    lengths = torch.ones(len(tokenizer), dtype=torch.float64)
    special = set(tokenizer.all_special_tokens)
    for token, index in tokenizer.get_vocab().items():
        if index >= len(lengths):
            continue
        if token in special:
            lengths[index] = 0
        elif byte_level:  # byte-level BPE spells each byte as one character
            lengths[index] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):  # SentencePiece byte fallback
            lengths[index] = 1
        else:  # SentencePiece marks a space with "▁" (decoding one piece would drop it)
            lengths[index] = max(1, len(token.replace("\u2581", " ").encode()))
    return lengths


def text_chunks(text: str, tokenizer, tokens: int) -> list[str]:
    """``text`` cut at token boundaries into pieces of ``tokens`` tokens (a shorter tail is dropped)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [text[offsets[i][0]:offsets[i + tokens - 1][1]] for i in range(0, len(offsets) - tokens + 1, tokens)]


def prompt_ids(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """The prompt's token ids: through the chat template when the tokenizer has one."""
    if not prompt:
        return []
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    text = "\n".join(m["content"] for m in messages) + "\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Encoded(NamedTuple):
    ids: list[int]
    #: how many of ``ids`` are prompt (a pair's completion ends with EOS)
    prompt_length: int
    #: for each completion token k: the bytes of the completion read before predicting it
    read: list[int]


def encode(tokenizer, source: Source) -> Encoded:
    """Token ids of a source, its prompt length, and the text read before each completion token.

    What has been read is measured at token *ends* (from the tokenizer's offsets), which do not
    depend on whether a tokenizer counts a word's leading space into the word (GPT-2's "Ġ",
    SentencePiece's "▁") or not.
    """
    prompt, completion = source
    head = prompt_ids(tokenizer, prompt)
    enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    tail = list(enc["input_ids"])
    ends = [len(completion[:end].encode()) for _, end in enc["offset_mapping"]]
    if prompt and tokenizer.eos_token_id is not None:
        tail = [*tail, tokenizer.eos_token_id]
    return Encoded(head + tail, len(head), [0, *ends][: len(tail)])


def align(student: Encoded, teacher: Encoded, how: str) -> Tensor:
    """For each student input position, the teacher input position compared with it (-1: none).

    Position ``i`` predicts token ``i + 1``; only positions that predict a completion token are
    aligned: by rank in the completion (``position``), or when both have read the same text
    (``offsets``).
    """
    s_ids, s_prompt = student.ids, student.prompt_length
    t_ids, t_prompt = teacher.ids, teacher.prompt_length
    out = torch.full((len(s_ids) - 1,), -1, dtype=torch.long)
    s_completion, t_completion = len(s_ids) - s_prompt, len(t_ids) - t_prompt
    if how == "position":
        pairs = [(k, k) for k in range(min(s_completion, t_completion))]
    elif how == "offsets":
        t_index: dict[int, int] = {}
        for k, read in enumerate(teacher.read[:t_completion]):
            t_index.setdefault(read, k)
        pairs = [(k, t_index[read]) for k, read in enumerate(student.read[:s_completion]) if read in t_index]
    else:
        raise ValueError(f"alignment must be 'position' or 'offsets', got {how!r}")
    for k_s, k_t in pairs:
        i, j = s_prompt + k_s - 1, t_prompt + k_t - 1
        if i >= 0 and 0 <= j < len(t_ids) - 1:
            out[i] = j
    return out


@dataclass
class Encoder:
    """Turns sources into examples: the student's ids and, for another teacher tokenizer, the
    teacher's ids and the alignment. ``max_length`` caps the tokens per example."""

    student: Any
    teacher: Any | None
    max_length: int
    alignment: str = "position"

    def __post_init__(self) -> None:
        self.student_bytes = token_byte_lengths(self.student)
        self.teacher_bytes = token_byte_lengths(self.teacher) if self.teacher is not None else None

    def __call__(self, source: Source) -> dict[str, Any]:
        return self._example(source)[0]

    def _example(self, source: Source) -> tuple[dict[str, Any], bool]:
        """The example, and whether either side had to be cut to ``max_length``."""
        sides = [encode(self.student, source)] + ([encode(self.teacher, source)] if self.teacher is not None else [])
        cut = any(len(side.ids) > self.max_length for side in sides)
        s, *teacher = [self.fit(side) for side in sides]
        example: dict[str, Any] = {"ids": torch.tensor(s.ids), "prompt_length": s.prompt_length}
        for t in teacher:
            example.update(teacher_ids=torch.tensor(t.ids), teacher_prompt_length=t.prompt_length,
                           alignment=align(s, t, self.alignment))
        return example, cut

    def fit(self, encoded: Encoded) -> Encoded:
        """``encoded`` cut to ``max_length`` tokens."""
        return encoded._replace(ids=encoded.ids[: self.max_length])

    def many(self, sources: list[Source]) -> list[dict[str, Any]]:
        """Examples of ``sources``; those with no completion token left within ``max_length`` are
        dropped, and both counts are logged."""
        examples, cuts = zip(*map(self._example, sources), strict=True) if sources else ((), ())
        kept = [e for e in examples if completion_tokens(e) >= 1]
        if any(cuts):
            log.warning("%d of %d sequences are longer than %d tokens: truncated", sum(cuts), len(sources),
                        self.max_length)
        if len(kept) < len(examples):
            log.warning("%d of %d sequences have no completion token within %d tokens: left out",
                        len(examples) - len(kept), len(examples), self.max_length)
        return kept


def completion_tokens(example: dict[str, Any]) -> int:
    """How many positions of an example carry a label (predict a completion token)."""
    return len(example["ids"]) - max(example["prompt_length"], 1)


def inputs_and_labels(ids: list[int] | Tensor, prompt_length: int) -> tuple[Tensor, Tensor]:
    """Next-token inputs and labels; positions that predict a prompt token are ``-100``."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    labels = ids[1:].clone()
    labels[: max(prompt_length - 1, 0)] = IGNORE_INDEX
    return ids[:-1], labels


def pad(rows: list[Tensor], value: int) -> Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def model_inputs(rows: list[Tensor]) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` and their ``attention_mask``."""
    return {"input_ids": pad(rows, 0), "attention_mask": pad([torch.ones_like(r) for r in rows], 0)}


def collate(examples: list[dict[str, Any]]) -> Batch:
    """Pad a list of examples into a :class:`Batch` (labels ``-100`` and alignment ``-1`` on padding)."""
    pairs = [inputs_and_labels(e["ids"], e["prompt_length"]) for e in examples]
    student = model_inputs([x for x, _ in pairs])
    labels = pad([y for _, y in pairs], IGNORE_INDEX)
    if "teacher_ids" not in examples[0]:
        return Batch(student_inputs=student, teacher_inputs=student, labels=labels)
    teacher = model_inputs([inputs_and_labels(e["teacher_ids"], 0)[0] for e in examples])
    return Batch(student_inputs=student, teacher_inputs=teacher, labels=labels,
                 alignment=pad([e["alignment"] for e in examples], -1))


def teacher_view(example: dict[str, Any]) -> dict[str, Any]:
    """The example as the teacher reads it (its own ids, no alignment)."""
    if "teacher_ids" not in example:
        return example
    return {"ids": example["teacher_ids"], "prompt_length": example["teacher_prompt_length"]}
