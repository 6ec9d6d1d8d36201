"""Text for masked-language-model distillation: token blocks, a WordPiece tokenizer, dynamic masking.

Text files are cut into blocks of ``max_length`` tokens wrapped in the tokenizer's special tokens
(``[CLS] … [SEP]`` for BERT; no next-sentence pairs, as DistilBERT and RoBERTa). Each block
remembers which word every token belongs to (the fast tokenizer's ``word_ids``), for whole-word
masking.

Masking follows BERT: each ordinary token is chosen with probability ``probability`` (15%); a
chosen token becomes ``[MASK]`` (80%), a random ordinary token (10%) or stays itself (10%), and it
is a prediction target (its label is the original id; every other label is -100). With
``whole_word`` a *word* is chosen with that probability and all its tokens with it.

Every example's mask is drawn from its own generator, seeded by (seed, epoch, example index)
(:func:`example_seed`): a fresh mask every epoch, the same one after a resume, and — because it
depends on neither the batch an example lands in nor its padding — the same one whatever the batch
size or the gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..losses import IGNORE_INDEX

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
#: word id of the special tokens a block is wrapped in (never masked)
NO_WORD = -1


def train_wordpiece(texts: Sequence[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer (lower-cased) trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token=UNK))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, CLS, SEP, MASK],
                                        show_progress=False)
    tok.train_from_iterator((line for text in texts for line in text.splitlines()), trainer)
    # the trainer numbers tokens of equal frequency in a different order from run to run: number them
    # in a fixed one (special tokens, then the rest sorted), so that a resumed run reads the same ids
    specials = [PAD, UNK, CLS, SEP, MASK]
    order = specials + sorted(set(tok.get_vocab()) - set(specials))
    tok.model = models.WordPiece({token: i for i, token in enumerate(order)}, unk_token=UNK)
    cls, sep = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls), (SEP, sep)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD, cls_token=CLS,
                                   sep_token=SEP, mask_token=MASK)


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after one sequence (``[CLS]``, ``[SEP]``)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise ValueError(f"{type(tokenizer).__name__}: cannot tell its special tokens apart from the text")


def text_blocks(texts: Sequence[str], tokenizer, max_length: int) -> list[dict[str, Tensor]]:
    """Each text cut into blocks of ``max_length`` tokens, special tokens included.

    Returns examples ``{"index", "input_ids", "word_ids"}``; ``word_ids`` numbers the words of a
    block from 0 (:data:`NO_WORD` at the special tokens). A block never spans two texts (files);
    the shorter tail of each text is dropped.
    """
    head, tail = special_wrapping(tokenizer)
    body = max_length - len(head) - len(tail)
    if body < 1:
        raise ValueError(f"data.max_length {max_length} leaves no room for text beside the "
                         f"{len(head) + len(tail)} special tokens")
    blocks: list[dict[str, Tensor]] = []
    for text in texts:
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            continue
        encoded = tokenizer(lines, add_special_tokens=False)
        ids: list[int] = []
        words: list[int] = []
        offset = 0
        for k, line_ids in enumerate(encoded["input_ids"]):
            line_words = [w if w is not None else 0 for w in encoded.word_ids(k)]
            ids += line_ids
            words += [offset + w for w in line_words]
            offset += (max(line_words) + 1) if line_words else 0
        for start in range(0, len(ids) - body + 1, body):
            piece = words[start:start + body]
            word_ids = [NO_WORD] * len(head) + [w - piece[0] for w in piece] + [NO_WORD] * len(tail)
            blocks.append({"index": len(blocks),
                           "input_ids": torch.tensor(head + ids[start:start + body] + tail),
                           "word_ids": torch.tensor(word_ids, dtype=torch.int32)})
    return blocks


def reindexed(examples: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The examples numbered 0, 1, … in their new order (a data set's ``index`` is its position)."""
    return [{**example, "index": i} for i, example in enumerate(examples)]


def example_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one example's mask in one epoch: independent of batching, fresh every epoch."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2 ** 63)


@dataclass(frozen=True)
class Masker:
    """BERT's masking of one sequence at a time (see the module docstring)."""

    mask_token_id: int
    #: token ids a random replacement is drawn from (the ordinary tokens)
    regular_ids: Tensor
    #: token ids that are never chosen (special tokens, padding)
    special_ids: Tensor
    probability: float = 0.15
    mask_share: float = 0.8
    random_share: float = 0.1
    whole_word: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer, probability: float = 0.15, mask_share: float = 0.8,
                      random_share: float = 0.1, whole_word: bool = False) -> Masker:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token: masked-LM training needs one")
        # [UNK] stands for real text: it may be chosen, but is never drawn as a random replacement
        never = {i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id}
        special = torch.tensor(sorted(never), dtype=torch.long)
        drawn = set(tokenizer.all_special_ids)
        regular = torch.tensor([i for i in range(len(tokenizer)) if i not in drawn], dtype=torch.long)
        return cls(tokenizer.mask_token_id, regular, special, probability, mask_share, random_share, whole_word)

    def example(self, ids: Tensor, generator: torch.Generator, word_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(inputs, labels)`` for one unpadded sequence ``ids`` ``[n]``, drawn from ``generator`` only.

        The draws are the same in number whatever is chosen, so a sequence's mask depends only on
        its generator, its length and (whole-word) its word boundaries.
        """
        n = len(ids)
        ordinary = ~torch.isin(ids, self.special_ids)
        if self.whole_word:
            if word_ids is None or len(word_ids) != n:
                raise ValueError("whole-word masking needs the word id of every token")
            words = int(word_ids.max().item()) + 1 if n else 0
            chosen_words = torch.rand(max(words, 0), generator=generator) < self.probability
            chosen = torch.zeros(n, dtype=torch.bool)
            in_word = word_ids >= 0
            chosen[in_word] = chosen_words[word_ids[in_word].long()]
        else:
            chosen = torch.rand(n, generator=generator) < self.probability
        chosen &= ordinary
        kind = torch.rand(n, generator=generator)
        random_ids = self.regular_ids[torch.randint(len(self.regular_ids), (n,), generator=generator)]
        inputs = ids.clone()
        masked = chosen & (kind < self.mask_share)
        randomised = chosen & (kind >= self.mask_share) & (kind < self.mask_share + self.random_share)
        inputs[masked] = self.mask_token_id
        inputs[randomised] = random_ids[randomised]
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        return inputs, labels

    def batch(self, input_ids: Tensor, attention_mask: Tensor, seeds: Sequence[int],
              word_ids: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(inputs, labels)`` of a padded batch ``[B, L]``, example ``b`` masked from ``seeds[b]``
        over its real tokens only (so padding never changes a mask). Computed on the CPU."""
        ids, keep = input_ids.cpu(), attention_mask.cpu().bool()
        inputs, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
        for b, seed in enumerate(seeds):
            where = keep[b].nonzero().flatten()
            generator = torch.Generator().manual_seed(seed)
            words = word_ids[b][: len(where)] if word_ids is not None else None
            inputs[b, where], labels[b, where] = self.example(ids[b, where], generator, words)
        return inputs.to(input_ids.device), labels.to(input_ids.device)
