"""Cross-modal distillation (DiVA): a text LLM teaches the same LLM to hear, through a connector.

The teacher is the frozen LLM reading each clip's transcript as the user's turn; the student is a
:class:`~potstill.speech_llm.SpeechLLM` around the same LLM that hears the clip. No instruction data
and no labels: the loss compares the two at the position that predicts the first response token.

- ``distillation.hidden``: L2 (mean squared error per dimension) between the LLM's final hidden
  states there (DiVA's loss; with the output embedding frozen, equal hidden states give equal
  next-token distributions);
- ``distillation.kl``: KL of the next-token distributions there (at ``temperature``);
- ``distillation.embeddings``: L2 between the k-th virtual token and the transcript's k-th token
  embedding (the first min(N, transcript length) of them).

Both the L2 and the KL are logged at every step whatever their weights. The Whisper encoder's
outputs are computed once per clip and cached (in memory, and as safetensors in the run
directory's ``encoder-cache/`` or ``data.encoder_cache``). Held-out metrics: next-token KL and top-1
agreement with the teacher at the first response position and over the teacher's short greedy
response (teacher-forced), for the trained connector, the untrained one, and the cascade (Whisper
transcribes, the LLM reads the transcript); and answers side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..config import ModelSpec, Recipe, _Section
from ..data.speech import SpeechDataSpec, pad_features, read_and_prepare
from ..io import atomic_path
from ..losses import kl_divergence, logit_mse
from ..metrics import wer
from ..models import count_parameters, evaluating
from ..objective import Objective, ObjectiveOutput, Term
from ..pretrained import SMOLLM2, WHISPER_BASE, load_causal_lm, load_tokenizer, resolve
from ..signals import LOGITS, capture
from ..speech_llm import (
    FINAL_STATE,
    VIRTUAL_TOKENS,
    Cascade,
    SpeechLLM,
    TextTeacher,
    answer_text,
    encoder_frames,
    load_whisper_parts,
    read_config,
    template_ids,
)
from .base import Batch, Task

log = logging.getLogger(__name__)

__all__ = ["DiVALoss", "SpeechLLMRecipe", "SpeechLLMTask"]

#: the vendored LJ Speech sentences held out by default (the rest, and the FSDD digits, train)
_VENDORED_EVAL = ["LJ001-0104", "LJ001-0174"]


class SpeechLLMData(_Section):
    name: Literal["speech"] = "speech"
    #: (audio, transcript) sets to distil on; default the clips that ship with potstill
    train: list[SpeechDataSpec] = Field(default_factory=lambda: [
        SpeechDataSpec(source="ljspeech", exclude_ids=_VENDORED_EVAL), SpeechDataSpec(source="fsdd")])
    #: held-out sets (real speech: other sentences, another speaker)
    eval: list[SpeechDataSpec] = Field(default_factory=lambda: [SpeechDataSpec(source="ljspeech", ids=_VENDORED_EVAL)])
    #: clips whose answers are shown side by side besides the first ``answers`` held-out ones (spoken questions)
    spoken_prompts: list[SpeechDataSpec] = Field(default_factory=list)
    #: a text instruction after the audio in the user's turn (DiVA: none)
    prompt: str | None = None
    #: transcripts longer than this (LLM tokens) are refused or skipped (by each set's on_bad_audio)
    max_transcript_tokens: int = Field(64, ge=1)
    #: the teacher's greedy response the held-out KL is also averaged over (tokens)
    response_tokens: int = Field(16, ge=1)
    #: held-out clips answered side by side, and the length of the answers
    answers: int = Field(4, ge=0)
    answer_tokens: int = Field(48, ge=1)
    #: compare with the cascade: Whisper (the student's encoder, with its decoder) transcribes, the LLM reads
    cascade: bool = True
    #: a folder for the encoder outputs (safetensors, reused by any run on the same clips and encoder);
    #: null: the run directory's encoder-cache/
    encoder_cache: str | None = None
    #: clips per encoder forward when caching (30-s windows)
    encoder_batch_size: int = Field(4, ge=1)
    #: clips per held-out forward
    eval_batch_size: int = Field(8, ge=1)


class LLMTeacherSpec(ModelSpec):
    """The text LLM: the teacher, and the frozen LLM inside the student."""

    model_name_or_path: str = SMOLLM2
    #: a GGUF file inside ``model_name_or_path`` (or give the ``.gguf`` path itself)
    gguf_file: str | None = None


class SpeechStudentSpec(ModelSpec):
    """The speech LLM: the teacher's LLM behind a Whisper encoder and a new (or saved) connector."""

    #: a saved SpeechLLM folder to start from (its connector and projection); null: a new connector
    model_name_or_path: str | None = None
    #: the Whisper whose encoder hears the audio (offline name, hub name or folder)
    encoder: str = WHISPER_BASE
    #: virtual audio tokens (DiVA: 448; fewer keep the LLM's sequences short on a CPU)
    num_queries: int = Field(32, ge=1)
    #: connector layers (null: all of the Whisper decoder's when init_from_decoder, else 2)
    connector_layers: int | None = Field(None, ge=1)
    #: start the connector's layers, norm and positions from the Whisper decoder (DiVA's initialisation)
    init_from_decoder: bool = True
    num_heads: int | None = Field(None, ge=1)
    ffn_dim: int | None = Field(None, ge=1)
    #: the encoder frames the connector attends to: those covering the audio, or all 1,500 of the 30-s window
    encoder_frames: Literal["audio", "all"] = "audio"


class DiVALoss(_Section):
    """Weights of the loss terms (0 drops a term; both L2 and KL are logged whatever their weights)."""

    #: L2 between the LLM's final hidden states (transcript vs virtual audio tokens), DiVA's loss
    hidden: float = Field(1.0, ge=0)
    #: L2 between the connector's outputs and the transcript's token embeddings, position by position
    embeddings: float = Field(0.0, ge=0)
    #: KL(teacher ‖ student) of the next-token distributions at the first response position
    kl: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)

    def describe(self) -> str:
        """The loss in words (for model cards)."""
        terms = [f"{w:g} × {name}" for w, name in ((self.hidden, "L2 of the final hidden state"),
                                                 (self.kl, f"KL at T = {self.temperature:g}"),
                                                 (self.embeddings, "L2 of the virtual tokens to the transcript's "
                                                                   "embeddings")) if w > 0]
        return "DiVA: " + " + ".join(terms) + " at the first response position"

    @model_validator(mode="after")
    def _teaches_the_response(self) -> DiVALoss:
        if self.hidden == 0 and self.kl == 0:
            raise ValueError("distillation.hidden or distillation.kl must be positive: the embeddings term alone "
                             "never compares what the LLM makes of the audio")
        return self


class SpeechLLMRecipe(Recipe):
    task: Literal["speech-llm"] = "speech-llm"
    data: SpeechLLMData = Field(default_factory=SpeechLLMData)
    teacher: LLMTeacherSpec = Field(default_factory=LLMTeacherSpec)
    student: SpeechStudentSpec = Field(default_factory=SpeechStudentSpec)
    distillation: DiVALoss = Field(default_factory=DiVALoss)  # type: ignore[assignment]
    #: no labels to train a scratch baseline on: the untrained connector and the cascade are the baselines
    baseline: bool = False

    @model_validator(mode="after")
    def _supported(self) -> SpeechLLMRecipe:
        if self.baseline:
            raise ValueError("baseline: a speech LLM has no labels to train from scratch on; the comparison "
                             "includes the untrained connector and the cascade instead (set baseline: false)")
        if self.teacher_cache is not None:
            raise ValueError("teacher_cache: the speech-llm task runs the frozen LLM live (its teacher pass is "
                             "short); remove the section")
        return self


class DiVAObjective(Objective):
    """The recipe's terms, plus the hidden-state L2 and the next-token KL logged at every step even
    when they weigh nothing (``monitor_l2`` / ``monitor_kl``), to watch the one follow the other."""

    @property
    def student_signals(self) -> set[str]:
        return super().student_signals | {LOGITS, FINAL_STATE}

    @property
    def teacher_signals(self) -> set[str]:
        return super().teacher_signals | {LOGITS, FINAL_STATE}

    def forward(self, student: Any, teacher: Any = None, **kwargs: Any) -> ObjectiveOutput:
        out = super().forward(student, teacher, **kwargs)
        if teacher is None:
            return out
        parts = dict(out.parts)
        with torch.no_grad():
            if "kl" not in parts:
                parts["monitor_kl"] = kl_divergence(student[LOGITS], teacher[LOGITS]).detach()
            if f"mse[{FINAL_STATE}]" not in parts:
                parts["monitor_l2"] = logit_mse(student[FINAL_STATE], teacher[FINAL_STATE]).detach()
        return ObjectiveOutput(out.loss, parts, out.values)


class EncodedClips(Dataset):
    """Prepared clips whose encoder outputs are computed on first use (by ``encode``), then kept."""

    def __init__(self, rows: Any, encode: Any):
        self.rows, self._encode = rows, encode
        self.transcripts: list[list[int]] = [list(map(int, ids)) for ids in rows["labels"]]
        self.texts: list[str] = list(rows["text"])
        self.ids: list[str] = list(rows["id"])
        self._states: list[Tensor] | None = None

    @property
    def states(self) -> list[Tensor]:
        if self._states is None:
            self._states = self._encode(self.rows)
        return self._states

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "states": self.states[index], "transcript": self.transcripts[index],
                "text": self.texts[index], "id": self.ids[index]}


class SpeechLLMTask(Task):
    """DiVA: the frozen LLM reading the transcript teaches the same LLM hearing the audio."""

    name = "speech-llm"
    recipe_type = SpeechLLMRecipe
    headline = ("kl_first", "agreement_first", "kl_response", "agreement_response")

    def __init__(self, recipe: SpeechLLMRecipe, progress: bool = True):
        super().__init__(recipe, progress)
        r = recipe
        self.llm_source = resolve(r.teacher.model_name_or_path, r.teacher.gguf_file)
        self.tokenizer = load_tokenizer(self.llm_source, r.teacher.trust_remote_code)
        # the frozen parts are loaded once and shared by the teacher and every student
        self.llm = load_causal_lm(self.llm_source, r.teacher.trust_remote_code).requires_grad_(False).eval()
        self.saved = read_config(r.student.model_name_or_path) if r.student.model_name_or_path else None
        self.whisper = load_whisper_parts(r.student.encoder)
        self._check_saved_student()
        self.num_queries = self.saved["connector"]["num_queries"] if self.saved else r.student.num_queries
        self.before, self.after = template_ids(self.tokenizer, r.data.prompt)
        self.cache_dir: Path | None = Path(r.data.encoder_cache) if r.data.encoder_cache else None
        self.train_set = self.transfer_set = self._clips(r.data.train, "train")
        self.eval_set = self._clips(r.data.eval, "eval")
        self.spoken = self._clips(r.data.spoken_prompts, "spoken-prompts") if r.data.spoken_prompts else None
        self._responses: list[list[int]] | None = None
        #: Whisper's transcripts of each clip set, for the cascade (computed once)
        self._heard: dict[int, list[str]] = {}

    # ----- data --------------------------------------------------------------------------------------------

    def _clips(self, specs: list[SpeechDataSpec], split: str) -> EncodedClips:
        """Decode, featurise and tokenise the sets (transcripts as plain LLM tokens), one data set."""
        from datasets import concatenate_datasets

        if not specs:
            raise ValueError(f"data.{split.replace('-', '_')}: no speech sets")
        extractor = self.whisper.feature_extractor
        cache = str(self.cache_dir / "features") if self.cache_dir else None
        parts = [read_and_prepare(spec, extractor, self.tokenizer, prefix_ids=[], suffix_ids=[], text_prefix="",
                                  max_label_length=self.recipe.data.max_transcript_tokens, cache_dir=cache,
                                  progress=self.progress, desc=f"Speech features ({split})") for spec in specs]
        rows = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        empty = [rows[i]["id"] for i, ids in enumerate(rows["labels"]) if not ids]
        if empty:
            raise ValueError(f"data.{split}: clips with an empty transcript: {', '.join(empty[:5])}")
        return EncodedClips(rows, lambda prepared: self._encoded(prepared, split))

    def _encoded(self, rows: Any, split: str) -> list[Tensor]:
        """Each clip's encoder outputs (float16; the frames covering the audio, or all), computed once:
        with a cache folder, one safetensors file per clip under a fingerprint of the encoder, named by
        a hash of the clip's features, so that any run on the same clips and encoder reuses them."""
        encoder, extractor = self.whisper.encoder, self.whisper.feature_extractor
        mode = self.recipe.student.encoder_frames
        features = _arrays(rows.with_format("numpy")["input_features"])
        durations = list(rows["duration"])
        identity = json.dumps([self.recipe.student.encoder, encoder.config.to_dict(), mode], sort_keys=True,
                              default=str)
        folder = self.cache_dir / hashlib.sha256(identity.encode()).hexdigest()[:16] if self.cache_dir else None
        paths = [folder / f"{hashlib.sha256(a.tobytes() + repr(d).encode()).hexdigest()[:32]}.safetensors"
                 if folder else None for a, d in zip(features, durations, strict=True)]
        states: list[Tensor | None] = [load_file(p)["states"] if p is not None and p.is_file() else None
                                       for p in paths]
        missing = [i for i, s in enumerate(states) if s is None]
        if folder is not None and len(missing) < len(states):
            log.info("%s: encoder outputs of %d of %d clips read from %s", split, len(states) - len(missing),
                     len(states), folder)
        max_frames = encoder.config.max_source_positions
        size = self.recipe.data.encoder_batch_size
        device = next(self.llm.parameters()).device
        with evaluating(encoder.to(device)):
            for start in tqdm(range(0, len(missing), size), desc=f"encoding {split} clips", leave=False,
                              disable=not self.progress):
                batch = missing[start:start + size]
                out = encoder(pad_features([features[i] for i in batch], 2 * max_frames).to(device))
                for i, row in zip(batch, out.last_hidden_state, strict=True):
                    # as SpeechLLM.generate counts them: from the number of samples
                    samples = round(durations[i] * extractor.sampling_rate)
                    frames = max_frames if mode == "all" else encoder_frames(samples, extractor.hop_length, max_frames)
                    states[i] = row[:frames].to(torch.float16).cpu().clone()
                    if paths[i] is not None:
                        with atomic_path(paths[i]) as tmp:
                            save_file({"states": states[i]}, tmp, metadata={"encoder": self.recipe.student.encoder})
        return [s for s in states if s is not None]

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        """Student: the cached encoder outputs and the template; teacher: the template around the transcript."""
        states = [e["states"] for e in examples]
        longest, width = max(len(s) for s in states), states[0].shape[-1]
        hidden = torch.zeros(len(states), longest, width)
        frame_mask = torch.zeros(len(states), longest, dtype=torch.bool)
        for i, s in enumerate(states):
            hidden[i, :len(s)] = s.float()
            frame_mask[i, :len(s)] = True
        b = len(examples)
        student = {"encoder_hidden_states": hidden, "encoder_attention_mask": frame_mask,
                   "prefix_ids": torch.tensor([self.before] * b, dtype=torch.long).view(b, -1),
                   "suffix_ids": torch.tensor([self.after] * b, dtype=torch.long).view(b, -1)}
        transcripts = [e["transcript"] for e in examples]
        teacher = self._teacher_inputs(transcripts, [e.get("response") for e in examples])
        alignment = torch.arange(self.num_queries)[None, :].expand(b, -1).clone()
        lengths = torch.tensor([len(t) for t in transcripts])
        alignment[alignment >= lengths[:, None]] = -1
        return Batch(student_inputs=student, teacher_inputs=teacher, alignment=alignment,
                     indices=torch.tensor([e["index"] for e in examples]))

    def _teacher_inputs(self, transcripts: Sequence[Sequence[int]],
                        responses: Sequence[Sequence[int] | None] = ()) -> dict[str, Tensor]:
        """``before + transcript + after (+ response[:-1])``, right-padded, and the positions predicting
        the first response token (and the rest of the response)."""
        responses = list(responses) or [None] * len(transcripts)
        steps = max((len(r) for r in responses if r), default=1)
        rows, positions = [], []
        for transcript, response in zip(transcripts, responses, strict=True):
            ids = self.before + list(transcript) + self.after
            last = len(ids) - 1
            if response:
                ids = ids + list(response[:-1])
            rows.append(ids)
            positions.append([last + k for k in range(steps)])
        longest = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
        # positions past a shorter response point into its padding: their logits are never used
        return {"input_ids": input_ids, "attention_mask": mask,
                "positions": torch.tensor(positions).clamp(max=longest - 1),
                "transcript_start": torch.full((len(rows),), len(self.before)),
                "transcript_length": torch.tensor([len(t) for t in transcripts])}

    # ----- models ------------------------------------------------------------------------------------------

    def _check_saved_student(self) -> None:
        """A saved student must fit this recipe's encoder and LLM (its widths are checked again when built)."""
        if self.saved is None:
            return
        width, llm_width = self.whisper.encoder.config.d_model, self.llm.get_input_embeddings().embedding_dim
        folder = self.recipe.student.model_name_or_path
        if self.saved["encoder_width"] != width:
            raise ValueError(f"student.model_name_or_path {folder}: its connector takes {self.saved['encoder_width']}-"
                             f"wide frames (encoder {self.saved['encoder']}), but student.encoder "
                             f"{self.recipe.student.encoder!r} outputs {width}-wide ones")
        if self.saved["llm_width"] != llm_width:
            raise ValueError(f"student.model_name_or_path {folder}: its projection writes {self.saved['llm_width']}-"
                             f"wide tokens (LLM {self.saved['llm']}), but the teacher "
                             f"{self.recipe.teacher.model_name_or_path!r} reads {llm_width}-wide ones")

    def build_model(self, spec: Any) -> nn.Module:
        if isinstance(spec, LLMTeacherSpec):
            return TextTeacher(self.llm)
        if spec.model_name_or_path:
            model = SpeechLLM.from_pretrained(spec.model_name_or_path, whisper=self.whisper, llm_model=self.llm)
        else:
            model = SpeechLLM.build(spec.encoder, self.recipe.teacher.model_name_or_path,
                                    num_queries=spec.num_queries, connector_layers=spec.connector_layers,
                                    init_from_decoder=spec.init_from_decoder, num_heads=spec.num_heads,
                                    ffn_dim=spec.ffn_dim, encoder_frames=spec.encoder_frames,
                                    llm_gguf_file=self.recipe.teacher.gguf_file, seed=self.recipe.train.seed,
                                    whisper=self.whisper, llm_model=self.llm, tokenizer=self.tokenizer)
        return model.to(next(self.llm.parameters()).device)

    def objective(self) -> Objective:
        d = self.recipe.distillation
        terms = [Term("kl", d.kl, params={"temperature": d.temperature}),
                 Term("mse", d.hidden, student=FINAL_STATE, teacher=FINAL_STATE),
                 Term("mse", d.embeddings, student=VIRTUAL_TOKENS, teacher=VIRTUAL_TOKENS)]
        return DiVAObjective(terms)

    def distillation_set(self, teacher: nn.Module, run_dir: Path) -> Dataset:
        """The training clips; their encoder outputs are cached in the run directory (unless
        ``data.encoder_cache`` names a folder)."""
        if self.cache_dir is None:
            self.cache_dir = run_dir / "encoder-cache"
        return self.transfer_set

    def load_model(self, folder: Path) -> nn.Module:
        return SpeechLLM.from_pretrained(folder, whisper=self.whisper, llm_model=self.llm)

    # ----- evaluation --------------------------------------------------------------------------------------

    def responses(self) -> list[list[int]]:
        """The teacher's greedy responses (token ids, at most ``data.response_tokens``) to the held-out
        transcripts, computed once."""
        if self._responses is None:
            from ..speech_llm import greedy, stop_ids

            device = next(self.llm.parameters()).device
            stop = stop_ids(self.tokenizer, self.llm)
            out = []
            with evaluating(self.llm):
                for transcript in tqdm(self.eval_set.transcripts, desc="teacher responses", leave=False,
                                       disable=not self.progress):
                    ids = torch.tensor([self.before + transcript + self.after], device=device)
                    embeds = self.llm.get_input_embeddings()(ids)
                    out.append(greedy(self.llm, embeds, self.recipe.data.response_tokens, stop))
            self._responses = out
        return self._responses

    def _batches(self, size: int) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
        responses = self.responses()
        for start in range(0, len(self.eval_set), size):
            indices = list(range(start, min(start + size, len(self.eval_set))))
            examples = [{**self.eval_set[i], "response": responses[i]} for i in indices]
            yield indices, examples

    def scores(self, models: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
        """Held-out next-token KL and top-1 agreement with the teacher (first response position, and over
        the teacher's greedy response), the final hidden states' L2, and per-clip (L2, KL) pairs."""
        teacher = TextTeacher(self.llm)
        device = next(self.llm.parameters()).device
        sums = {name: {"kl_first": 0.0, "agree_first": 0, "kl_response": 0.0, "agree_response": 0, "tokens": 0,
                       "l2": 0.0, "points": [], "agree": []} for name in models}
        transcripts = {name: self.cascade_transcripts(m) for name, m in models.items() if isinstance(m, Cascade)}
        with evaluating(teacher, *models.values()):
            for indices, examples in tqdm(list(self._batches(self.recipe.data.eval_batch_size)), desc="evaluating",
                                          leave=False, disable=not self.progress):
                responses = [e["response"] for e in examples]
                t_hidden, t_logits = self._read(teacher, self._teacher_inputs([e["transcript"] for e in examples],
                                                                                 responses), device)
                lengths = torch.tensor([len(r) for r in responses], device=device)
                keep = torch.arange(t_logits.shape[1], device=device)[None, :] < lengths[:, None]
                for name, model in models.items():
                    if isinstance(model, Cascade):
                        heard = [self.tokenizer(transcripts[name][i], add_special_tokens=False)["input_ids"]
                                 for i in indices]
                        hidden, logits = self._read(teacher, self._teacher_inputs(heard, responses), device)
                    else:
                        batch = self.collate(examples)
                        inputs = {**batch.student_inputs, "response_ids": _padded(responses),
                                  "response_mask": keep.long()}
                        hidden, logits = self._read(model, inputs, device)
                    kl = kl_divergence(logits, t_logits, reduction="none")
                    agree = logits.argmax(-1) == t_logits.argmax(-1)
                    l2 = (hidden.float() - t_hidden.float()).pow(2).mean(-1)
                    s = sums[name]
                    s["kl_first"] += kl[:, 0].sum().item()
                    s["agree_first"] += agree[:, 0].sum().item()
                    s["kl_response"] += kl[keep].sum().item()
                    s["agree_response"] += agree[keep].sum().item()
                    s["tokens"] += int(keep.sum())
                    s["l2"] += l2.sum().item()
                    s["points"] += [[a, b] for a, b in zip(l2.tolist(), kl[:, 0].tolist(), strict=True)]
                    s["agree"] += agree[:, 0].long().tolist()
        n = len(self.eval_set)
        out = {}
        for name, s in sums.items():
            out[name] = {"kl_first": s["kl_first"] / n, "agreement_first": s["agree_first"] / n,
                         "kl_response": s["kl_response"] / s["tokens"],
                         "agreement_response": s["agree_response"] / s["tokens"], "hidden_l2": s["l2"] / n,
                         "points": s["points"], "agreements": s["agree"]}
            if name in transcripts:
                out[name]["wer"] = wer(self.eval_set.texts, transcripts[name])
        return out

    @staticmethod
    def _read(model: nn.Module, inputs: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """A model's final hidden state [B, D] and its logits along the response [B, R, V]."""
        with capture(model, [FINAL_STATE]) as captured:
            out = model(**{k: v.to(device) for k, v in inputs.items()})
        return captured[FINAL_STATE], out.get("response_logits", out[LOGITS][:, None])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        score = self.scores({"model": model})["model"]
        return {f"eval_{k}": v for k, v in score.items() if k not in ("points", "agreements")}

    # ----- the comparison ----------------------------------------------------------------------------------

    def untrained(self) -> SpeechLLM:
        """The student as it starts: the same connector initialisation (same seed), untrained."""
        return self.build_model(self.recipe.student)

    def cascade(self) -> Cascade | None:
        """Whisper (the student's encoder's full model) transcribing, the LLM reading; None for a bare encoder."""
        if self.whisper.model is None:
            log.info("no cascade: %s is a bare encoder", self.recipe.student.encoder)
            return None
        whisper_tokenizer = load_tokenizer(resolve(self.recipe.student.encoder))
        return Cascade(self.whisper.model, whisper_tokenizer, self.llm, self.tokenizer)

    def cascade_transcripts(self, cascade: Cascade, clips: EncodedClips | None = None) -> list[str]:
        """Whisper's transcripts of a clip set (the held-out one by default), computed once."""
        clips = clips or self.eval_set
        if id(clips) not in self._heard:
            rows = clips.rows.with_format("numpy")
            frames = 2 * self.whisper.encoder.config.max_source_positions
            size = self.recipe.data.eval_batch_size
            heard: list[str] = []
            for start in tqdm(range(0, len(rows), size), desc="cascade: transcribing", leave=False,
                              disable=not self.progress):
                heard += cascade.transcribe(pad_features(_arrays(rows[start:start + size]["input_features"]), frames))
            self._heard[id(clips)] = heard
        return self._heard[id(clips)]

    def answers(self, models: dict[str, nn.Module]) -> list[dict[str, str]]:
        """Answers side by side: the teacher reading the transcript, each speech model hearing the clip,
        the cascade reading Whisper's transcript; for the first held-out clips and the spoken prompts."""
        clips = [(self.eval_set, i) for i in range(min(self.recipe.data.answers, len(self.eval_set)))]
        if self.spoken is not None:
            clips += [(self.spoken, i) for i in range(len(self.spoken))]
        tokens, prompt = self.recipe.data.answer_tokens, self.recipe.data.prompt
        rows = []
        with evaluating(*models.values()):
            for clip_set, i in clips:
                text = clip_set.texts[i]
                row = {"id": clip_set.ids[i], "transcript": text,
                       "teacher (reads the transcript)": answer_text(self.llm, self.tokenizer, text, prompt,
                                                                     max_new_tokens=tokens)}
                for name, model in models.items():
                    if isinstance(model, Cascade):
                        transcript = self.cascade_transcripts(model, clip_set)[i]
                        row[f"{name} transcript"] = transcript
                        row[name] = model.generate_from_text(transcript, prompt, max_new_tokens=tokens)
                    elif isinstance(model, SpeechLLM):
                        states = clip_set.states[i][None].float()
                        row[name] = model.generate_from_states(states, None, prompt, max_new_tokens=tokens)
                rows.append(row)
        return rows

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        speech = {name: m for name, m in models.items() if name != "teacher"}
        speech["untrained connector"] = self.untrained()
        cascade = self.cascade() if self.recipe.data.cascade else None
        if cascade is not None:
            speech["cascade"] = cascade
        scores = self.scores(speech)
        table: dict[str, dict[str, Any]] = {}
        for name, model in {"teacher": models["teacher"], **speech}.items():
            entry: dict[str, Any] = {"parameters": count_parameters(model)}
            if isinstance(model, SpeechLLM):
                entry["trainable_parameters"] = model.trainable_parameters()
            entry.update({k: v for k, v in scores.get(name, {}).items() if k not in ("points", "agreements")})
            table[name] = entry
        out: dict[str, Any] = {"models": table, "headline": list(self.headline), "eval_clips": len(self.eval_set),
                               "train_clips": len(self.train_set),
                               "kl_vs_l2": {name: s["points"] for name, s in scores.items() if name != "cascade"},
                               # per held-out clip, in the order of eval_ids: [L2, KL, top-1 agreement] (first token)
                               "per_clip": {name: [[*p, a] for p, a in zip(s["points"], s["agreements"], strict=True)]
                                            for name, s in scores.items()}, "eval_ids": self.eval_set.ids}
        out["panels"] = [{"title": "held-out clips: next-token KL against final hidden-state L2",
                          "xlabel": "L2 of the final hidden state (mean square per dimension)",
                          "ylabel": "KL(teacher ‖ model), first response token", "kind": "scatter",
                          "series": {name: {"x": [p[0] for p in points], "y": [p[1] for p in points]}
                                     for name, points in out["kl_vs_l2"].items()},
                          "xscale": "log", "yscale": "log"}]
        if "student" in scores:
            before, after = scores["untrained connector"], scores["student"]
            out["kl_reduction"] = {k: 1 - after[k] / before[k] for k in ("kl_first", "kl_response") if before[k] > 0}
        out["answers"] = self.answers(speech)
        return out


def _arrays(column: Any) -> list[Any]:
    """A column of ``[n_mels, frames]`` features as 2-D float32 arrays (datasets' numpy format gives
    ragged rows as arrays of arrays)."""
    import numpy as np

    return [np.stack(list(a)).astype(np.float32) if a.dtype == object else a.astype(np.float32) for a in column]


def _padded(sequences: Sequence[Sequence[int]], value: int = 0) -> Tensor:
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out
