"""Speech recognition: a Whisper teacher distilled into a student with fewer decoder layers (distil-whisper).

- **Student**: the teacher's encoder, frozen, and a decoder of chosen teacher layers (first and
  last by default; ``influence:N`` measured while the teacher decodes training audio), cut by
  :func:`potstill.students.make_student` — or a Whisper of its own (``model_name_or_path``).
- **Pseudo-labels**: the teacher transcribes the training audio once (greedy; kept in the run
  directory, resumable). A clip whose pseudo-label's WER against its transcript exceeds
  ``pseudo_labels.wer_threshold`` is dropped (counted in the log); audio without a transcript
  keeps its pseudo-label as the only target — the unlabelled-audio setting distil-whisper exploits.
- **Loss**: the recipe's ``distillation`` section: ``alpha`` · KL(teacher ‖ student) at
  ``temperature`` on the decoder's token distributions + (1 − ``alpha``) · CE on the pseudo-labels.
  With the encoder frozen and shared, its outputs are computed once per clip and cached
  (:mod:`.speech_cache`): training runs the decoders only.
- **Evaluation**: greedy transcription of the eval set (:mod:`.transcription`): WER after
  Whisper's English normaliser, decoder tokens per second, and the real-time factor of the whole
  transcription, for the teacher, the cut student before training and the distilled student.

Teachers with different tokenizers (whisper-tiny.en: 51,864 ids; whisper-base: 51,865, special
tokens elsewhere) are distilled through the pseudo-labels (``alpha: 0``, the exchange is text)
or ULD (``loss: uld``); a KL-family loss across them is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config import DistillationSpec, ModelSpec, Recipe, RecipeError, _Section
from ..data.speech import SpeechDataSpec, pad_features, read_speech, whisper_prompt_ids
from ..losses import IGNORE_INDEX, get_loss
from ..metrics import normalize_english, wer
from ..models import count_parameters, evaluating
from ..pretrained import WHISPER_BASE, Source, load_processor, load_whisper, resolve
from ..students import LayerSelection, make_student
from .base import Batch, Task
from .speech_cache import EncoderCache, clips_fingerprint, encoder_fingerprint, pseudo_labels
from .transcription import Transcripts, transcribe

log = logging.getLogger(__name__)

PSEUDO_LABELS = "pseudo-labels.json"
ENCODER_CACHE = "encoder-cache"
#: the vendored LJ Speech sentences and FSDD digits held out by the default data
HELD_OUT_LJSPEECH = ["LJ001-0013", "LJ001-0174"]
HELD_OUT_FSDD = [f"{d}_jackson_0" for d in range(5)]
#: what the comparison calls the student cut from the teacher before any training
UNDISTILLED = "cut, not distilled"

__all__ = ["SpeechRecognition", "SpeechRecognitionRecipe"]


# ---- the recipe ------------------------------------------------------------------------------------------------


class SpeechSource(SpeechDataSpec):
    """One source of clips (see :class:`potstill.data.speech.SpeechDataSpec`), with a name."""

    #: what metrics and logs call it (an eval source's WER is ``wer_<name>``); default: its ``source``
    name: str | None = None


def _default_train() -> list[SpeechSource]:
    return [SpeechSource(source="ljspeech", exclude_ids=HELD_OUT_LJSPEECH),
            SpeechSource(source="fsdd", ids=[f"{d}_jackson_0" for d in range(5, 10)])]


def _default_eval() -> list[SpeechSource]:
    return [SpeechSource(source="ljspeech", ids=HELD_OUT_LJSPEECH), SpeechSource(source="fsdd", ids=HELD_OUT_FSDD)]


class SpeechData(_Section):
    """Training and evaluation clips; the defaults are the clips that ship with potstill
    (four LJ Speech sentences and five digits to train on, the other two and five to evaluate)."""

    train: list[SpeechSource] = Field(default_factory=_default_train, min_length=1)
    eval: list[SpeechSource] = Field(default_factory=_default_eval, min_length=1)
    #: the transcripts' language: a multilingual Whisper is prompted with it (an English-only one takes only "en")
    language: str = "en"
    #: clips transcribed at once when evaluating
    eval_batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _unique_eval_names(self) -> SpeechData:
        names = [s.name or s.source for s in self.eval]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"eval sources need distinct names (their WERs are wer_<name>); {', '.join(repeated)} "
                             "repeats: give each a name")
        return self


class WhisperTeacherSpec(ModelSpec):
    """A pretrained Whisper: an offline name (whisper-base, whisper-tiny.en), a folder or a hub name."""

    model_name_or_path: str | None = WHISPER_BASE

    @model_validator(mode="after")
    def _pretrained(self) -> WhisperTeacherSpec:
        if not self.model_name_or_path:
            raise ValueError("a speech-recognition teacher is a pretrained Whisper: set model_name_or_path "
                             f"(e.g. {WHISPER_BASE}, whisper-tiny.en, a folder, openai/whisper-small)")
        return self


class WhisperStudentSpec(ModelSpec):
    """The student: cut from the teacher (its encoder and some decoder layers), or a Whisper of its own."""

    #: the teacher's decoder layers to keep: "first-last", "every-other", a list such as [0, 5], or
    #: "influence:N" (the N that change the hidden state most while the teacher decodes training audio);
    #: null = first-last, unless model_name_or_path names a student of its own
    layers_from_teacher: LayerSelection | None = None
    #: keep the encoder's weights as they are (distil-whisper). A frozen encoder that is the teacher's
    #: (a student cut from it) reads the cached encoder outputs: training runs the decoder only
    freeze_encoder: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> WhisperStudentSpec:
        if self.model_name_or_path and self.layers_from_teacher is not None:
            raise ValueError("give the student either model_name_or_path (a Whisper of its own) or "
                             "layers_from_teacher (cut from the teacher), not both")
        return self

    @property
    def selection(self) -> LayerSelection | None:
        """The decoder layers to keep, or None for a student of its own."""
        return None if self.model_name_or_path else (self.layers_from_teacher or "first-last")


class PseudoLabelSpec(_Section):
    """The teacher's transcripts of the training audio, written once into the run directory."""

    #: train on the teacher's transcripts (false: on the data's own, which every clip then needs)
    enabled: bool = True
    #: drop a clip whose pseudo-label's WER (normalised) against its transcript exceeds this; null: keep
    #: every clip. Clips without a transcript keep theirs
    wer_threshold: float | None = Field(0.1, ge=0)
    #: clips the teacher transcribes at once
    batch_size: int = Field(16, ge=1)
    #: tokens the teacher may write per clip (also the limit when evaluating); a clip whose
    #: transcription does not end within it is dropped
    max_new_tokens: int = Field(128, ge=1)
    #: null: <run dir>/pseudo-labels.json; a file elsewhere lets runs on the same clips and teacher share it
    path: str | None = None


class EncoderCacheSpec(_Section):
    """The teacher's encoder outputs, computed once per clip (see potstill.tasks.speech_cache)."""

    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    #: null: <run dir>/encoder-cache; another folder lets runs on the same clips and teacher share it
    path: str | None = None
    #: clips per safetensors file
    shard_size: int = Field(64, ge=1)
    #: clips through the encoder at once
    batch_size: int = Field(8, ge=1)


class SpeechRecognitionRecipe(Recipe):
    task: Literal["speech-recognition"] = "speech-recognition"
    data: SpeechData = Field(default_factory=SpeechData)
    teacher: WhisperTeacherSpec = Field(default_factory=WhisperTeacherSpec)
    student: WhisperStudentSpec = Field(default_factory=WhisperStudentSpec)
    pseudo_labels: PseudoLabelSpec = Field(default_factory=PseudoLabelSpec)
    encoder_cache: EncoderCacheSpec = Field(default_factory=EncoderCacheSpec)
    #: distil-whisper's weights: KL 1, CE 0.8 (alpha = 1 / 1.8), temperature 2
    distillation: DistillationSpec = Field(default_factory=lambda: DistillationSpec(alpha=0.55, temperature=2.0))
    #: also train the cut student with CE on the data's own transcripts (no teacher) for comparison;
    #: the cut student before training is always compared
    baseline: bool = False

    @model_validator(mode="after")
    def _no_top_k_cache(self) -> SpeechRecognitionRecipe:
        if self.teacher_cache is not None:
            raise ValueError("teacher_cache: a top-k teacher cache is not supported for speech recognition; the "
                             "teacher's encoder outputs are cached instead (encoder_cache), and its decoder is cheap")
        return self


# ---- the task --------------------------------------------------------------------------------------------------


def _decoder_sequences(sequences: Sequence[Sequence[int]], prompt_length: int, pad: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Decoder inputs, labels and attention mask from whole sequences (prompt + text + end-of-text).

    ``labels[j] = s[j + 1]``; the positions that would predict the prompt's own tokens are -100
    (the prompt is forced when transcribing), so every position that counts predicts the text or its end.
    """
    length = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), length), pad, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, s in enumerate(sequences):
        n = len(s) - 1
        inputs[row, :n] = torch.tensor(s[:-1])
        labels[row, :n] = torch.tensor(s[1:])
        labels[row, : prompt_length - 1] = IGNORE_INDEX
        mask[row, :n] = 1
    return inputs, labels, mask


def _position_alignment(student_length: int, student_prompt: int, teacher_length: int, teacher_prompt: int,
                        width: int) -> Tensor:
    """ULD's pairing across tokenizers: the student position predicting its k-th text token (or the end)
    with the teacher position predicting the teacher's k-th, as far as the shorter one goes."""
    out = torch.full((width,), -1, dtype=torch.long)
    count = min(student_length - student_prompt, teacher_length - teacher_prompt)
    for k in range(max(0, count)):
        out[student_prompt - 1 + k] = teacher_prompt - 1 + k
    return out


class _Clips:
    """Prepared clips of several sources: features, decoder sequences, transcripts, ids, durations, origin."""

    def __init__(self, sources: Sequence[SpeechSource], feature_extractor: Any, tokenizer: Any, prompt: list[int],
                 max_label_length: int | None, progress: bool, split: str):
        from ..data.speech import prepare

        parts, self.origin, self.names = [], [], []
        for number, spec in enumerate(sources):
            rows = prepare(read_speech(spec), feature_extractor, tokenizer, prefix_ids=prompt,
                           num_proc=spec.num_proc, on_bad_audio=spec.on_bad_audio, silence_rms=spec.silence_rms,
                           max_label_length=max_label_length, progress=progress,
                           desc=f"{split} {spec.name or spec.source} features")
            parts.append(rows)
            self.origin += [number] * len(rows)
            self.names.append(spec.name or spec.source)
        import datasets

        self.rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        self.features = self.rows.with_format("numpy", columns=["input_features"])
        self.ids: list[str] = [str(i) for i in self.rows["id"]]
        self.texts: list[str] = list(self.rows["text"])
        self.durations: list[float] = [float(d) for d in self.rows["duration"]]
        self.sequences: list[list[int]] = [list(map(int, s)) for s in self.rows["labels"]]

    def __len__(self) -> int:
        return len(self.ids)

    def labelled(self, index: int) -> bool:
        return bool(self.texts[index].strip())

    def input_features(self, indices: Sequence[int], num_frames: int) -> Tensor:
        return pad_features([self.features[int(i)]["input_features"] for i in indices], num_frames)


class SpeechRecognition(Task):
    """Whisper distillation (distil-whisper): pseudo-labels, a cut decoder, cached encoder outputs."""

    name = "speech-recognition"
    recipe_type = SpeechRecognitionRecipe
    headline = ("wer", "decoder_tokens_per_second", "real_time_factor")

    def __init__(self, recipe: SpeechRecognitionRecipe, progress: bool = True):
        super().__init__(recipe, progress)
        r = recipe
        self._teacher: nn.Module | None = None
        self.teacher_source = resolve(r.teacher.model_name_or_path or WHISPER_BASE)
        self.teacher_processor = load_processor(self.teacher_source)
        self.student_source = resolve(r.student.model_name_or_path) if r.student.model_name_or_path else None
        self.processor = load_processor(self.student_source) if self.student_source else self.teacher_processor
        self.teacher_tokenizer, self.tokenizer = self.teacher_processor.tokenizer, self.processor.tokenizer
        self.cross = self.tokenizer.get_vocab() != self.teacher_tokenizer.get_vocab()
        self._check_cross_tokenizer()
        self.feature_extractor = self.teacher_processor.feature_extractor
        self._check_features()
        self.num_frames = int(getattr(self.feature_extractor, "nb_max_frames", 3000))
        self.teacher_prompt = self._prompt(self.teacher_source, self.teacher_tokenizer, "teacher")
        self.prompt = self._prompt(self.student_source or self.teacher_source, self.tokenizer, "student")
        self.eos = int(self.tokenizer.eos_token_id)
        self.teacher_eos = int(self.teacher_tokenizer.eos_token_id)
        limit = self._max_target_positions(self.student_source or self.teacher_source)
        self.train_clips = _Clips(r.data.train, self.feature_extractor, self.tokenizer, self.prompt, limit,
                                  progress, "train")
        self.eval_clips = _Clips(r.data.eval, self.feature_extractor, self.tokenizer, self.prompt, limit,
                                 progress, "eval")
        if not any(self.eval_clips.labelled(i) for i in range(len(self.eval_clips))):
            raise ValueError("data.eval: no clip has a transcript to score the models against")
        self._train_cache: EncoderCache | None = None
        self._eval_cache: EncoderCache | None = None
        self._shares_encoder: bool | None = None
        self._examples: list[dict[str, Any]] | None = None
        #: what the pseudo-labels kept and dropped (filled by distillation_set)
        self.pseudo_label_counts: dict[str, int] = {}

    # ----- set-up checks -----------------------------------------------------------------------

    def _check_cross_tokenizer(self) -> None:
        d = self.recipe.distillation
        if not self.cross:
            return
        if get_loss(d.loss).kind != "cross-vocabulary" and d.alpha > 0:
            raise RecipeError(
                f"field 'distillation.loss': the student's tokenizer ({len(self.tokenizer):,} tokens) differs from "
                f"the teacher's ({len(self.teacher_tokenizer):,}), so {d.loss!r} would compare unrelated token ids. "
                "Use loss: uld (distillation across tokenizers), or the pseudo-labels alone (distillation.alpha: 0), "
                "or give the student the teacher's tokenizer.")

    def _check_features(self) -> None:
        student = self.processor.feature_extractor
        teacher = self.feature_extractor
        for field in ("feature_size", "sampling_rate", "hop_length", "n_samples"):
            if getattr(student, field, None) != getattr(teacher, field, None):
                raise RecipeError(f"field 'student.model_name_or_path': the student's feature extractor has "
                                  f"{field}={getattr(student, field, None)}, the teacher's "
                                  f"{getattr(teacher, field, None)}: they must read the same log-mel features")

    def _prompt(self, source: Source, tokenizer: Any, who: str) -> list[int]:
        """The decoder prompt: start, [language, transcribe,] no timestamps."""
        multilingual = _generation_setting(source, "is_multilingual")
        language = self.recipe.data.language
        if multilingual is None:
            multilingual = tokenizer.convert_tokens_to_ids(f"<|{language}|>") not in (None, tokenizer.unk_token_id)
        if not multilingual and language != "en":
            raise RecipeError(f"field 'data.language': the {who} ({source.path}) is an English-only Whisper; it "
                              f"cannot transcribe {language!r}")
        return whisper_prompt_ids(tokenizer, language=language if multilingual else None)

    @staticmethod
    def _max_target_positions(source: Source) -> int | None:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(source.path), "max_target_positions", None)

    # ----- models ------------------------------------------------------------------------------

    def pretrained_teacher(self) -> nn.Module:
        """The teacher, loaded once (eval mode)."""
        if self._teacher is None:
            self._teacher = load_whisper(self.teacher_source).eval()
        return self._teacher

    def build_model(self, spec: ModelSpec) -> nn.Module:
        if isinstance(spec, WhisperTeacherSpec):
            return self.pretrained_teacher()
        assert isinstance(spec, WhisperStudentSpec)
        if spec.selection is None:
            assert self.student_source is not None
            model = load_whisper(self.student_source)
        else:
            model = make_student(self.pretrained_teacher(), {"decoder": spec.selection}, self.calibration)
        model.requires_grad_(True)  # a copy of a teacher frozen by an earlier stage would be frozen too
        if spec.freeze_encoder:
            model.get_encoder().requires_grad_(False)
        return model

    def calibration(self, count: int = 16, batch_size: int = 4) -> list[dict[str, Tensor]]:
        """Training clips spread over the data, with the teacher's own greedy transcripts as the decoder's
        input (for ``influence:N``: how much each decoder layer changes the hidden state while it decodes)."""
        teacher = self.pretrained_teacher()
        clips = self.train_clips
        chosen = [i * len(clips) // min(count, len(clips)) for i in range(min(count, len(clips)))]
        batches = []
        for start in range(0, len(chosen), batch_size):
            indices = chosen[start:start + batch_size]
            features = clips.input_features(indices, self.num_frames)
            out = transcribe(teacher, prompt=self.teacher_prompt, eos_token_id=self.teacher_eos,
                             max_new_tokens=self.recipe.pseudo_labels.max_new_tokens, input_features=features)
            sequences = [self.teacher_prompt + t if t and t[-1] == self.teacher_eos else
                         self.teacher_prompt + t + [self.teacher_eos] for t in out.tokens]
            inputs, _, mask = _decoder_sequences(sequences, len(self.teacher_prompt), self.teacher_eos)
            batches.append({"input_features": features, "decoder_input_ids": inputs, "decoder_attention_mask": mask})
        return batches

    def shares_encoder(self) -> bool:
        """Whether the student's encoder is frozen and is the teacher's: it then reads the cached outputs."""
        if self._shares_encoder is None:
            spec = self.recipe.student
            if not spec.freeze_encoder:
                self._shares_encoder = False
            elif spec.selection is not None:
                self._shares_encoder = True
            else:  # a student of its own (e.g. one cut earlier by `potstill init-student`)
                student = self.build_model(spec)
                self._shares_encoder = encoder_fingerprint(student) == encoder_fingerprint(self.pretrained_teacher())
        return self._shares_encoder

    def load_model(self, folder: Path) -> nn.Module:
        model = load_whisper(Source(str(folder)))
        if self.recipe.student.freeze_encoder:
            model.get_encoder().requires_grad_(False)
        return model

    def save_extras(self, folder: Path) -> None:
        """The processor (tokenizer + feature extractor) beside the model: the folder loads with
        ``AutoProcessor`` and ``WhisperForConditionalGeneration``."""
        self.processor.save_pretrained(str(folder))

    # ----- caches and training examples ----------------------------------------------------------

    def _cache_folder(self, split: str) -> Path | None:
        spec = self.recipe.encoder_cache
        if spec.path:
            return Path(spec.path) / split
        return self.run_dir / ENCODER_CACHE / split if self.run_dir is not None else None

    def _encoder_cache(self, clips: _Clips, split: str) -> EncoderCache:
        teacher = self.pretrained_teacher()
        spec = self.recipe.encoder_cache
        identity = {"teacher": self.recipe.teacher.model_name_or_path, "encoder": encoder_fingerprint(teacher),
                    "clips": clips_fingerprint(clips.ids, clips.durations), "frames": self.num_frames}
        cache = EncoderCache(self._cache_folder(split), identity, len(clips), dtype=spec.dtype,
                             shard_size=spec.shard_size)
        return cache.fill(teacher, lambda indices: clips.input_features(indices, self.num_frames),
                          batch_size=spec.batch_size, progress=self.progress, desc=f"{split} encoder outputs")

    def train_cache(self) -> EncoderCache:
        """The teacher's encoder outputs of the training clips (computed on first use)."""
        if self._train_cache is None:
            self._train_cache = self._encoder_cache(self.train_clips, "train")
        return self._train_cache

    def eval_cache(self) -> EncoderCache:
        if self._eval_cache is None:
            self._eval_cache = self._encoder_cache(self.eval_clips, "eval")
        return self._eval_cache

    @property
    def transfer_set(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The clips that have transcripts, with them as targets (the baseline's training set)."""
        clips = self.train_clips
        out = [self._example(i, clips.sequences[i]) for i in range(len(clips)) if clips.labelled(i)]
        if not out:
            raise ValueError("data.train: no clip has a transcript (the baseline trains on transcripts: "
                             "set baseline: false)")
        return out

    @property
    def train_set(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.transfer_set

    def _example(self, index: int, sequence: list[int], teacher_sequence: list[int] | None = None) -> dict[str, Any]:
        example: dict[str, Any] = {"key": index, "labels": sequence}
        if self.cross:
            if teacher_sequence is None:  # the transcript through the teacher's tokenizer
                text = self.train_clips.texts[index].strip()
                ids = self.teacher_tokenizer(" " + text, add_special_tokens=False)["input_ids"] if text else []
                teacher_sequence = self.teacher_prompt + list(ids) + [self.teacher_eos]
            example["teacher_labels"] = teacher_sequence
        return example

    def distillation_set(self, teacher: nn.Module, run_dir: Path) -> list[dict[str, Any]]:
        """The clips the student distils on, each with its target: the teacher's pseudo-label (written
        once into ``run_dir``; clips whose pseudo-label is too far from their transcript dropped), or the
        data's own transcript with ``pseudo_labels.enabled: false``."""
        if self.run_dir is None:
            self.run_dir = Path(run_dir)
        self._teacher = teacher
        if self._examples is None:
            self._examples = self._pseudo_examples() if self.recipe.pseudo_labels.enabled else self._labelled()
        return self._examples

    def _labelled(self) -> list[dict[str, Any]]:
        clips = self.train_clips
        unlabelled = [clips.ids[i] for i in range(len(clips)) if not clips.labelled(i)]
        if unlabelled:
            raise RecipeError(f"field 'pseudo_labels.enabled': {len(unlabelled)} training clips have no transcript "
                              f"(e.g. {', '.join(unlabelled[:3])}); without pseudo-labels every clip needs one")
        return self.transfer_set

    def _pseudo_examples(self) -> list[dict[str, Any]]:
        spec, clips = self.recipe.pseudo_labels, self.train_clips
        cache = self.train_cache()
        teacher = self.pretrained_teacher()
        identity = {"teacher": self.recipe.teacher.model_name_or_path, "encoder": cache.manifest["identity"]["encoder"],
                    "prompt": self.teacher_prompt, "max_new_tokens": spec.max_new_tokens}
        path = Path(spec.path) if spec.path else self.run_dir / PSEUDO_LABELS if self.run_dir is not None else None
        labels = pseudo_labels(
            path, clips.ids,
            lambda indices: transcribe(teacher, prompt=self.teacher_prompt, eos_token_id=self.teacher_eos,
                                       max_new_tokens=spec.max_new_tokens, encoder_hidden=cache.get(indices)),
            identity=identity, decode=lambda tokens: self.teacher_tokenizer.decode(tokens, skip_special_tokens=True),
            batch_size=spec.batch_size, progress=self.progress)
        return self._filter(labels)

    def _filter(self, labels: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Examples of the pseudo-labels that pass: ended within the budget, and (with a transcript) within
        the WER threshold of it. Counts and a few of the dropped go to the log."""
        spec, clips = self.recipe.pseudo_labels, self.train_clips
        english = self.recipe.data.language == "en"
        examples, far, unfinished = [], [], []
        labelled = unlabelled = 0
        for index in range(len(clips)):
            entry = labels[index]
            text = entry["text"].strip()
            labelled += clips.labelled(index)
            if not entry["finished"]:
                unfinished.append(clips.ids[index])
                continue
            if not clips.labelled(index):
                unlabelled += 1
            elif spec.wer_threshold is not None and _has_words(clips.texts[index], english):
                error = wer([clips.texts[index]], [text], normalize=english)
                if error > spec.wer_threshold:
                    far.append((clips.ids[index], error, clips.texts[index], text))
                    continue
            tokens = [int(t) for t in entry["tokens"]]
            if self.cross:
                ids = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"] if text else []
                sequence = self.prompt + list(ids) + [self.eos]
                examples.append(self._example(index, sequence, self.teacher_prompt + tokens))
            else:
                examples.append(self._example(index, self.prompt + tokens))
        self.pseudo_label_counts = {"clips": len(clips), "kept": len(examples), "with_transcripts": labelled,
                                    "dropped_wer": len(far), "dropped_unfinished": len(unfinished),
                                    "kept_without_transcripts": unlabelled}
        threshold = f"{spec.wer_threshold:.0%}" if spec.wer_threshold is not None else "-"
        message = (f"pseudo-labels: training on {len(examples)} of {len(clips)} clips; dropped {len(far)} of "
                   f"{labelled} with transcripts whose pseudo-label's WER exceeds {threshold}"
                   + (" (e.g. " + "; ".join(f"{i}: {e:.0%}, {r!r} heard as {h!r}" for i, e, r, h in far[:3]) + ")"
                      if far else "")
                   + f", and {len(unfinished)} whose transcription did not end within "
                     f"{spec.max_new_tokens} tokens" + (f" ({', '.join(unfinished[:3])})" if unfinished else "")
                   + f"; {unlabelled} clips without transcripts keep their pseudo-labels as the only target")
        log.log(logging.WARNING if far and len(far) > labelled / 2 else logging.INFO, message)
        if not examples:
            raise ValueError(f"no training clips left: every pseudo-label was dropped ({len(far)} too far from "
                             f"their transcripts, {len(unfinished)} unfinished); check the teacher and data.language, "
                             "or raise pseudo_labels.wer_threshold / max_new_tokens")
        return examples

    # ----- batches -----------------------------------------------------------------------------

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        """Examples → a Batch. The student reads the cached encoder outputs when it shares the teacher's
        encoder, else the log-mel features; the teacher always reads its cached encoder outputs."""
        keys = [int(e["key"]) for e in examples]
        inputs, labels, mask = _decoder_sequences([e["labels"] for e in examples], len(self.prompt), self.eos)
        hidden = (self.train_cache().get(keys),)
        decoder = {"decoder_input_ids": inputs, "decoder_attention_mask": mask}
        if self.shares_encoder():
            student = {"encoder_outputs": hidden, **decoder}
        else:
            student = {"input_features": self.train_clips.input_features(keys, self.num_frames), **decoder}
        if not self.cross:
            teacher = student if self.shares_encoder() else {"encoder_outputs": hidden, **decoder}
            return Batch(student_inputs=student, teacher_inputs=teacher, labels=labels)
        t_inputs, _, t_mask = _decoder_sequences([e["teacher_labels"] for e in examples], len(self.teacher_prompt),
                                                 self.teacher_eos)
        alignment = torch.stack([
            _position_alignment(len(e["labels"]), len(self.prompt), len(e["teacher_labels"]),
                                len(self.teacher_prompt), labels.shape[1]) for e in examples])
        teacher = {"encoder_outputs": hidden, "decoder_input_ids": t_inputs, "decoder_attention_mask": t_mask}
        return Batch(student_inputs=student, teacher_inputs=teacher, labels=labels, alignment=alignment)

    # ----- evaluation --------------------------------------------------------------------------

    def _transcribe_eval(self, model: nn.Module, prompt: list[int], eos: int, cached: bool) -> Transcripts:
        clips, size = self.eval_clips, self.recipe.data.eval_batch_size
        # clips of similar duration share a batch (a batch decodes until its longest transcript ends)
        order = sorted(range(len(clips)), key=lambda i: clips.durations[i])
        out = Transcripts()
        with evaluating(model):
            for start in range(0, len(order), size):
                indices = order[start:start + size]
                kwargs = ({"encoder_hidden": self.eval_cache().get(indices)} if cached else
                          {"input_features": clips.input_features(indices, self.num_frames)})
                out.extend(transcribe(model, prompt=prompt, eos_token_id=eos,
                                      max_new_tokens=self.recipe.pseudo_labels.max_new_tokens, **kwargs))
        return out.reordered([order.index(i) for i in range(len(clips))])

    def _scores(self, texts: list[str]) -> dict[str, float]:
        """WER overall and per eval source (clips without transcripts are not scored)."""
        clips, english = self.eval_clips, self.recipe.data.language == "en"
        scored = [i for i in range(len(clips)) if clips.labelled(i)]
        scores = {"wer": wer([clips.texts[i] for i in scored], [texts[i] for i in scored], normalize=english)}
        if len(clips.names) > 1:
            for number, name in enumerate(clips.names):
                mine = [i for i in scored if clips.origin[i] == number]
                if mine:
                    scores[f"wer_{name}"] = wer([clips.texts[i] for i in mine], [texts[i] for i in mine],
                                                normalize=english)
        return scores

    def _texts(self, out: Transcripts, tokenizer: Any) -> list[str]:
        return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """WER of the student on the eval set (from the cached encoder outputs when it shares the teacher's encoder)."""
        out = self._transcribe_eval(model, self.prompt, self.eos, cached=self.shares_encoder())
        return {f"eval_{k}": v for k, v in self._scores(self._texts(out, self.tokenizer)).items()}

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """Every model transcribes the eval set from its audio features (encoder included, timed): WER,
        decoder tokens per second and real-time factor; the cut student before training is added."""
        ordered = {"teacher": models["teacher"]}
        device = next(models["teacher"].parameters()).device
        undistilled = UNDISTILLED if self.recipe.student.selection is not None else "student, not distilled"
        ordered[undistilled] = self.build_model(self.recipe.student).to(device)
        ordered.update({k: v for k, v in models.items() if k != "teacher"})
        audio_seconds = sum(self.eval_clips.durations)
        result: dict[str, Any] = {"models": {}, "transcripts": {}}
        for name, model in ordered.items():
            is_teacher = name == "teacher"
            prompt, eos, tokenizer = ((self.teacher_prompt, self.teacher_eos, self.teacher_tokenizer) if is_teacher
                                      else (self.prompt, self.eos, self.tokenizer))
            self._warm_up(model, prompt, eos)
            out = self._transcribe_eval(model, prompt, eos, cached=False)
            texts = self._texts(out, tokenizer)
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model.decoder
            entry = {"parameters": count_parameters(model), **self._scores(texts),
                     "decoder_tokens_per_second": out.generated_tokens / out.decoder_seconds,
                     "real_time_factor": (out.encoder_seconds + out.decoder_seconds) / audio_seconds,
                     "decoder_layers": int(model.config.decoder_layers),
                     "decoder_parameters": count_parameters(decoder),
                     "timing": {"generated_tokens": out.generated_tokens, "encoder_seconds": out.encoder_seconds,
                                "decoder_seconds": out.decoder_seconds, "encoder_cpu_seconds": out.encoder_cpu_seconds,
                                "decoder_cpu_seconds": out.decoder_cpu_seconds,
                                "decoder_tokens_per_cpu_second": out.generated_tokens / out.decoder_cpu_seconds}}
            result["models"][name] = entry
            result["transcripts"][name] = texts
        teacher = result["models"]["teacher"]
        for entry in result["models"].values():
            entry["decoder_speedup"] = entry["decoder_tokens_per_second"] / teacher["decoder_tokens_per_second"]
            entry["timing"]["decoder_speedup_cpu"] = (entry["timing"]["decoder_tokens_per_cpu_second"]
                                                      / teacher["timing"]["decoder_tokens_per_cpu_second"])
        result["panels"] = [{
            "title": "word error rate against decoder speed (eval set)", "xlabel": "decoder tokens per second",
            "ylabel": "WER", "kind": "scatter",
            "series": {name: {"x": [m["decoder_tokens_per_second"]], "y": [m["wer"]]}
                       for name, m in result["models"].items()}}]
        result.update({
            "headline": list(self.headline), "eval_clips": len(self.eval_clips), "eval_audio_seconds": audio_seconds,
            "eval_ids": self.eval_clips.ids, "references": self.eval_clips.texts,
            "pseudo_labels": self.pseudo_label_counts, "torch_threads": torch.get_num_threads(),
            "note": "real_time_factor = transcription seconds (encoder + greedy decoder) / audio seconds; "
                    "decoder_tokens_per_second = tokens written / decoder seconds (batches of "
                    f"{self.recipe.data.eval_batch_size})"})
        return result

    def _warm_up(self, model: nn.Module, prompt: list[int], eos: int) -> None:
        """One short transcription first, so that one-time costs (allocations, kernel choice) are not timed."""
        with evaluating(model):
            transcribe(model, prompt=prompt, eos_token_id=eos, max_new_tokens=2,
                       input_features=self.eval_clips.input_features([0], self.num_frames))


def _has_words(text: str, english: bool) -> bool:
    return bool((normalize_english(text) if english else text).split())


def _generation_setting(source: Source, key: str) -> Any:
    """A value of the model's ``generation_config.json`` (None if it has none)."""
    local = Path(source.path) / "generation_config.json"
    if local.is_file():
        return json.loads(local.read_text()).get(key)
    from transformers import GenerationConfig

    try:
        return getattr(GenerationConfig.from_pretrained(source.path), key, None)
    except OSError:
        return None
