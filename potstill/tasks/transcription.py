"""Greedy Whisper transcription, timed: the encoder once per clip, then the decoder token by token.

The decoder loop is written out here rather than taken from ``model.generate`` so that it can
start from encoder outputs computed earlier (the encoder-output cache) and so that the encoder
and the decoder are timed apart: *decoder tokens per second* is what a smaller decoder speeds
up, the *real-time factor* is the whole transcription. It is Whisper's greedy decoding: the
prompt is forced, the model's ``suppress_tokens`` are never written and its
``begin_suppress_tokens`` not as the first token, and a clip ends at ``<|endoftext|>``; for
the pretrained Whisper models it writes the same tokens as ``model.generate`` (tested).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import synchronize

__all__ = ["Transcripts", "encode", "greedy_decode", "transcribe"]


@dataclass
class Transcripts:
    """Token ids a model wrote for each clip (prompt left out; ``<|endoftext|>`` kept when written),
    whether each ended within its budget, and the wall time of the encoder and of the decoder."""

    tokens: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    encoder_seconds: float = 0.0
    decoder_seconds: float = 0.0
    #: the process's CPU time (all its threads): steadier than wall time on a busy machine
    encoder_cpu_seconds: float = 0.0
    decoder_cpu_seconds: float = 0.0

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def extend(self, other: Transcripts) -> None:
        self.tokens += other.tokens
        self.finished += other.finished
        self.encoder_seconds += other.encoder_seconds
        self.decoder_seconds += other.decoder_seconds
        self.encoder_cpu_seconds += other.encoder_cpu_seconds
        self.decoder_cpu_seconds += other.decoder_cpu_seconds

    def reordered(self, order: Sequence[int]) -> Transcripts:
        """The same transcripts with clip ``order[i]`` at position ``i``."""
        return Transcripts([self.tokens[i] for i in order], [self.finished[i] for i in order], self.encoder_seconds,
                           self.decoder_seconds, self.encoder_cpu_seconds, self.decoder_cpu_seconds)


def encode(model: nn.Module, input_features: Tensor) -> Tensor:
    """The encoder's last hidden state ``[B, frames, width]`` for log-mel ``input_features``."""
    return model.get_encoder()(input_features).last_hidden_state


def _blocked(model: nn.Module, name: str, vocab: int) -> list[int]:
    """Token ids the model's generation config forbids (ids beyond its vocabulary ignored)."""
    ids = getattr(getattr(model, "generation_config", None), name, None) or []
    return [int(i) for i in ids if 0 <= int(i) < vocab]


@torch.no_grad()
def greedy_decode(model: nn.Module, encoder_hidden: Tensor, prompt: Sequence[int], eos_token_id: int,
                  max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Greedy decoding of a batch from its encoder outputs; returns the tokens after the prompt
    (``eos_token_id`` included where written) and whether each clip ended within ``max_new_tokens``.

    A clip that has ended leaves the batch (its rows of the key/value cache are dropped), so the
    others decode as if alone and a long or looping transcript costs only its own steps. The
    budget is cut to what the decoder's positions allow (``max_target_positions``).
    """
    from transformers.modeling_outputs import BaseModelOutput

    batch, device = encoder_hidden.shape[0], encoder_hidden.device
    limit = getattr(model.config, "max_target_positions", None)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - len(prompt))
    # transformers 5 calls the key/value cache ``cache`` (``past_key_values`` before)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    hidden = encoder_hidden
    inputs = torch.tensor([list(prompt)] * batch, dtype=torch.long, device=device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    active = list(range(batch))  # the clips still decoding, in the order of the batch's rows
    cache = None
    suppress: list[int] | None = None
    begin: list[int] = []
    for step in range(max(0, max_new_tokens)):
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), decoder_input_ids=inputs,
                    use_cache=True, **{cache_name: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        logits = out.logits[:, -1].float()
        if suppress is None:
            suppress = _blocked(model, "suppress_tokens", logits.shape[-1])
            begin = _blocked(model, "begin_suppress_tokens", logits.shape[-1])
        if suppress:
            logits[:, suppress] = -torch.inf
        if step == 0 and begin:
            logits[:, begin] = -torch.inf
        chosen = logits.argmax(-1)
        keep = []
        for row, (clip, token) in enumerate(zip(active, chosen.tolist(), strict=True)):
            tokens[clip].append(token)
            if token == eos_token_id:
                finished[clip] = True
            else:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            if hasattr(cache, "batch_select_indices"):
                cache.batch_select_indices(rows)
            else:  # older transformers: a tuple of per-layer (self k, self v, cross k, cross v)
                cache = tuple(tuple(t[rows] for t in layer) for layer in cache)
            hidden, chosen = hidden[rows], chosen[rows]
            active = [active[row] for row in keep]
        inputs = chosen[:, None]
    return tokens, finished


def transcribe(model: nn.Module, *, prompt: Sequence[int], eos_token_id: int, max_new_tokens: int,
               input_features: Tensor | None = None, encoder_hidden: Tensor | None = None) -> Transcripts:
    """Transcribe one batch greedily, from log-mel ``input_features`` (the encoder runs, timed) or
    from ``encoder_hidden`` computed earlier (the encoder time is then 0)."""
    if (input_features is None) == (encoder_hidden is None):
        raise ValueError("give input_features or encoder_hidden (one of them)")
    device = next(model.parameters()).device
    encoder_seconds = encoder_cpu = 0.0
    with torch.no_grad():
        if encoder_hidden is None:
            assert input_features is not None
            synchronize(device)
            start, cpu = time.perf_counter(), time.process_time()
            encoder_hidden = encode(model, input_features.to(device))
            synchronize(device)
            encoder_seconds, encoder_cpu = time.perf_counter() - start, time.process_time() - cpu
        encoder_hidden = encoder_hidden.to(device=device, dtype=next(model.parameters()).dtype)
        start, cpu = time.perf_counter(), time.process_time()
        tokens, finished = greedy_decode(model, encoder_hidden, prompt, eos_token_id, max_new_tokens)
        synchronize(device)
    return Transcripts(tokens, finished, encoder_seconds, time.perf_counter() - start, encoder_cpu,
                       time.process_time() - cpu)
