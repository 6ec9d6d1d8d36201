"""Speech examples in, model-ready features out.

Four sources give one shape of rows — ``{"audio", "text", "id", "name"}`` in a
:class:`datasets.Dataset` — so that one :func:`prepare` serves all of them:

- ``ljspeech``: a folder with ``metadata.csv`` (``id|raw text|normalized text``) and ``wavs/ID.wav``
  (or ``.flac``);
- ``fsdd``: the Free Spoken Digit Dataset, ``recordings/{digit}_{speaker}_{idx}.wav``; the
  transcript is the digit as a word ("zero" … "nine");
- ``manifest``: a JSON-lines file of ``{"audio": path relative to the manifest, "text": ...}``;
- ``dataset``: a Hugging Face data set (``load_dataset`` name or folder, or a ``save_to_disk``
  folder) whose audio column holds ``{"bytes", "path"}`` (TalkBank-style corpora, or a
  ``datasets.Audio`` column: read undecoded, see below), ``{"array", "sampling_rate"}``, a path or bytes.

``audio`` is whatever the source holds (a ``{"bytes", "path"}`` dict for every source but arrays);
``name`` is what an error calls the row: ``"train[17] (segment_id=abc)"``, or
``"/data/metadata.csv:18 (LJ001-0017)"``, or empty for an FSDD file (its path names it).

:func:`prepare` decodes every row with :func:`potstill.audio.decode_audio` (libsndfile on an
in-memory buffer for bytes; downmixed; resampled to the feature extractor's rate with soxr),
computes log-mel features with the model's own feature extractor and tokenises the transcript
between the decoder prompt and end-of-text. It runs as ``Dataset.map(batched=True,
num_proc=N)``, so it shows datasets' progress bar and reuses its cache. A row whose audio cannot
be used (missing, empty, corrupt, truncated, silent, longer than the model's window) either stops
the run with an error naming the row (``on_bad_audio="fail"``) or is dropped and counted in a
WARNING that names the first few (``"skip"``); nothing is dropped silently.

``datasets`` 5 decodes an ``Audio`` column through torchcodec (an FFmpeg binding that is not a
dependency of potstill): without it, reading such a column raises ImportError. potstill therefore
always casts an ``Audio`` column to ``Audio(decode=False)`` — the stored ``{"bytes", "path"}``,
no decoder needed — and decodes the bytes itself, with the same checks as any other file.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field, model_validator

from ..audio import AudioError, decode_audio, from_samples
from ..config import _Section
from . import VENDORED_FSDD, VENDORED_LJSPEECH

logger = logging.getLogger(__name__)

#: FSDD transcripts: the digit as an English word
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FSDD_NAME = re.compile(r"^(\d)_(.+)_(\d+)$")
#: the columns every reader produces
ROW_COLUMNS = ("audio", "text", "id", "name")
#: how many bad rows a "skip" warning names (the count is always complete)
_NAMED_IN_WARNING = 5


class SpeechDataSpec(_Section):
    """Where (audio, transcript) pairs come from, and what to do with audio that cannot be used."""

    source: Literal["ljspeech", "fsdd", "manifest", "dataset"]
    #: ljspeech / fsdd: the folder (null = the sample that ships with potstill); manifest: the
    #: JSON-lines file; dataset: a ``datasets`` name or folder, or a folder written by ``save_to_disk``
    path: str | None = None
    #: dataset: the split to read
    split: str = "train"
    #: dataset / manifest: the column (key) holding the audio, the transcript, and an id that
    #: error messages name (e.g. "segment_id"); TalkBank-style sets use ``text_column: transcript``
    audio_column: str = "audio"
    text_column: str = "text"
    id_column: str | None = None
    #: ljspeech: the transcript column of metadata.csv ("raw": as read, with digits and
    #: abbreviations, as Whisper writes; "normalized": numbers and abbreviations spelled out)
    ljspeech_text: Literal["raw", "normalized"] = "raw"
    #: fsdd: only these speakers (null = all)
    fsdd_speakers: list[str] | None = None
    #: fsdd: only recordings with ``start <= idx < stop`` (by convention ``[0, 5]`` is the test split)
    fsdd_index: tuple[int, int] | None = None
    #: only these ids (LJ Speech: "LJ001-0002"; FSDD: "3_jackson_0"; dataset: id_column's values)
    ids: list[str] | None = None
    #: never these ids (e.g. the held-out sentences, in the training set's section)
    exclude_ids: list[str] = Field(default_factory=list)
    #: the first N rows left after the selection above
    max_examples: int | None = Field(None, ge=1)
    #: worker processes for decoding and feature extraction (datasets.map's num_proc)
    num_proc: int = Field(1, ge=1)
    #: a row whose audio is missing, empty, corrupt, silent or too long: stop with an error naming it
    #: ("fail"), or drop it and name it in a warning with the count of rows dropped ("skip")
    on_bad_audio: Literal["fail", "skip"] = "fail"
    #: audio whose RMS amplitude (full scale 1) is at or below this is silent (1e-4 ≈ -80 dBFS, about
    #: 3 steps of 16-bit audio); null = no silence check
    silence_rms: float | None = Field(1e-4, ge=0)

    @model_validator(mode="after")
    def _fields_of_the_source(self) -> SpeechDataSpec:
        only = {"split": ("dataset",), "audio_column": ("dataset", "manifest"), "text_column": ("dataset", "manifest"),
                "id_column": ("dataset", "manifest"), "ljspeech_text": ("ljspeech",),
                "fsdd_speakers": ("fsdd",), "fsdd_index": ("fsdd",)}
        for field, sources in only.items():
            # a resolved recipe writes every field out: a default value read back is not a choice
            chosen = field in self.model_fields_set and getattr(self, field) != type(self).model_fields[field].default
            if chosen and self.source not in sources:
                raise ValueError(f"{field} applies to source {' / '.join(sources)}, not {self.source!r}")
        if self.source in ("manifest", "dataset") and not self.path:
            raise ValueError(f"source {self.source!r} needs a path")
        if self.fsdd_index is not None and not 0 <= self.fsdd_index[0] < self.fsdd_index[1]:
            raise ValueError(f"fsdd_index must be [start, stop) with 0 <= start < stop, got {list(self.fsdd_index)}")
        return self


def read_speech(spec: SpeechDataSpec) -> Any:
    """The rows ``spec`` selects, as a :class:`datasets.Dataset` of :data:`ROW_COLUMNS` (not decoded yet)."""
    if spec.source == "ljspeech":
        rows = read_ljspeech(spec.path or VENDORED_LJSPEECH, text=spec.ljspeech_text)
    elif spec.source == "fsdd":
        rows = read_fsdd(spec.path or VENDORED_FSDD, speakers=spec.fsdd_speakers, index=spec.fsdd_index)
    elif spec.source == "manifest":
        rows = read_manifest(spec.path, audio_key=spec.audio_column, text_key=spec.text_column,
                             id_key=spec.id_column)
    else:
        rows = read_dataset(spec.path, split=spec.split, audio_column=spec.audio_column,
                            text_column=spec.text_column, id_column=spec.id_column)
    return select_rows(rows, ids=spec.ids, exclude_ids=spec.exclude_ids, max_examples=spec.max_examples)


def select_rows(rows: Any, *, ids: Sequence[str] | None = None, exclude_ids: Sequence[str] = (),
                max_examples: int | None = None) -> Any:
    """Keep the rows whose id is in ``ids`` (if given) and not in ``exclude_ids``, then the first ``max_examples``.

    An id in ``ids`` that no row has is an error (a typo would otherwise shrink a test set unseen).
    """
    if ids is None and not exclude_ids and max_examples is None:
        return rows
    have = [str(i) for i in rows["id"]]
    wanted = None if ids is None else set(ids)
    if wanted is not None:
        missing = sorted(wanted - set(have))
        if missing:
            raise ValueError(f"ids not found among the {len(have)} rows: {', '.join(missing[:10])}"
                             + (f" … ({len(missing)} in all)" if len(missing) > 10 else ""))
    excluded = set(exclude_ids)
    keep = [i for i, x in enumerate(have) if (wanted is None or x in wanted) and x not in excluded]
    if max_examples is not None:
        keep = keep[:max_examples]
    if not keep:
        raise ValueError("no rows left after selecting by ids / exclude_ids")
    return rows.select(keep)


def _rows(audio: list[Any], text: list[str], ids: list[str], names: list[str]) -> Any:
    """Rows of audio files. Their fingerprint (datasets' cache key) covers each file's size and
    modification time, so that :func:`prepare`'s cache is not reused after a file changes."""
    from datasets import Dataset, Features, Value
    from datasets.fingerprint import Hasher

    features = Features({"audio": {"bytes": Value("binary"), "path": Value("string")},
                         "text": Value("string"), "id": Value("string"), "name": Value("string")})
    rows = Dataset.from_dict({"audio": audio, "text": text, "id": ids, "name": names}, features=features)
    stamps = []
    for a in audio:
        try:
            stat = Path(a["path"]).stat()
            stamps.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamps.append(None)
    return Dataset(rows.data, info=rows.info, fingerprint=Hasher.hash([rows._fingerprint, stamps]))


def read_ljspeech(folder: str | Path, *, text: Literal["raw", "normalized"] = "raw") -> Any:
    """LJ Speech: ``metadata.csv`` lines ``id|raw text|normalized text``; audio ``wavs/ID.wav`` or ``wavs/ID.flac``.

    A line without three fields is an error naming ``metadata.csv:LINE``. A missing audio file
    is left for :func:`prepare` to report (as any unreadable audio, by ``on_bad_audio``).
    """
    folder = Path(folder).absolute()
    metadata = folder / "metadata.csv"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} does not exist: an LJ Speech folder holds metadata.csv and wavs/")
    audio, texts, ids, names = [], [], [], []
    with metadata.open(encoding="utf-8", newline="") as f:
        # no quoting: LJ Speech transcripts hold bare double quotes
        for number, fields in enumerate(csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE), start=1):
            if not fields:
                continue
            if len(fields) != 3 or not fields[0]:
                raise ValueError(f"{metadata}:{number}: expected 'id|raw text|normalized text', got {len(fields)} "
                                 f"field(s): {'|'.join(fields)[:80]!r}")
            key = fields[0]
            wav = folder / "wavs" / f"{key}.wav"
            path = wav if wav.exists() or not (folder / "wavs" / f"{key}.flac").exists() else wav.with_suffix(".flac")
            audio.append({"bytes": None, "path": str(path)})
            texts.append(fields[1] if text == "raw" else fields[2])
            ids.append(key)
            names.append(f"{metadata}:{number} ({key})")
    if not ids:
        raise ValueError(f"{metadata} lists no recordings")
    return _rows(audio, texts, ids, names)


def read_fsdd(folder: str | Path, *, speakers: Sequence[str] | None = None,
              index: tuple[int, int] | None = None) -> Any:
    """The Free Spoken Digit Dataset: ``{digit}_{speaker}_{idx}.wav`` in ``folder/recordings`` (or ``folder``).

    The transcript is the digit as a word. ``speakers`` and ``index`` (``[start, stop)`` of idx;
    ``(0, 5)`` is the conventional test split) select recordings. Rows are ordered by speaker, idx,
    digit, so that the first rows hold every digit. A ``.wav`` whose name does not follow the
    pattern is an error naming it.
    """
    folder = Path(folder).absolute()
    recordings = folder / "recordings" if (folder / "recordings").is_dir() else folder
    if not recordings.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of FSDD recordings")
    found = []
    for path in recordings.glob("*.wav"):
        match = _FSDD_NAME.match(path.stem)
        if not match:
            raise ValueError(f"{path}: an FSDD recording is named {{digit}}_{{speaker}}_{{idx}}.wav")
        digit, speaker, idx = int(match[1]), match[2], int(match[3])
        found.append((speaker, idx, digit, path))
    if not found:
        raise FileNotFoundError(f"{recordings} holds no .wav recordings")
    if speakers is not None:
        known = {f[0] for f in found}
        unknown = sorted(set(speakers) - known)
        if unknown:
            raise ValueError(f"FSDD speakers not found in {recordings}: {', '.join(unknown)} "
                             f"(found: {', '.join(sorted(known))})")
        found = [f for f in found if f[0] in set(speakers)]
    if index is not None:
        found = [f for f in found if index[0] <= f[1] < index[1]]
    if not found:
        raise ValueError(f"no FSDD recordings in {recordings} match speakers={speakers} index={index}")
    found.sort(key=lambda f: (f[0], f[1], f[2]))
    return _rows([{"bytes": None, "path": str(f[3])} for f in found], [DIGITS[f[2]] for f in found],
                 [f[3].stem for f in found], ["" for _ in found])


def read_manifest(path: str | Path, *, audio_key: str = "audio", text_key: str = "text",
                  id_key: str | None = None) -> Any:
    """A JSON-lines manifest: one ``{"audio": path, "text": transcript}`` object per line.

    Audio paths are relative to the manifest's folder (or absolute). The id is ``id_key``'s value,
    or the audio path as written. A line that is not such an object is an error naming ``FILE:LINE``.
    """
    path = Path(path).absolute()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    audio, texts, ids, names = [], [], [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object with {audio_key!r} and {text_key!r}")
            for key in (audio_key, text_key) + ((id_key,) if id_key else ()):
                if not isinstance(entry.get(key), str):
                    raise ValueError(f"{where}: {key!r} must be a string, got {entry.get(key)!r}"
                                     + _close(key, entry))
            audio.append({"bytes": None, "path": str(path.parent / entry[audio_key])})
            texts.append(entry[text_key])
            ids.append(entry[id_key] if id_key else entry[audio_key])
            names.append(where)
    if not ids:
        raise ValueError(f"manifest {path} holds no entries")
    return _rows(audio, texts, ids, names)


def read_dataset(path: str | Path, *, split: str = "train", audio_column: str = "audio", text_column: str = "text",
                 id_column: str | None = None) -> Any:
    """A Hugging Face data set's ``split``: a ``save_to_disk`` folder, or anything ``load_dataset`` reads."""
    import datasets

    folder = Path(path)
    saved = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
    if folder.is_dir() and any((folder / f).is_file() for f in saved):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{folder} has no split {split!r}; it has {', '.join(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(str(path), split=split)
    return from_dataset(loaded, audio_column=audio_column, text_column=text_column, id_column=id_column, label=split)


def from_dataset(dataset: Any, *, audio_column: str = "audio", text_column: str = "text",
                 id_column: str | None = None, label: str = "train") -> Any:
    """Rows of :data:`ROW_COLUMNS` from a :class:`datasets.Dataset` (no audio is copied or decoded).

    Rows are named ``label[i] (id_column=value)`` in errors. An ``Audio`` column is cast to
    ``Audio(decode=False)`` (see the module's note on torchcodec).
    """
    from datasets import Audio, Value

    columns = list(dataset.column_names)
    for role, column in (("audio_column", audio_column), ("text_column", text_column), ("id_column", id_column)):
        if column is not None and column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            raise ValueError(f"{role} {column!r} is not a column of the data set (columns: {', '.join(columns)})"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
    if audio_column == text_column:
        raise ValueError(f"audio_column and text_column are both {audio_column!r}")
    feature = dataset.features[audio_column]
    if isinstance(feature, Audio):
        dataset = dataset.cast_column(audio_column, Audio(decode=False))
    elif not (_is_audio_struct(feature) or (isinstance(feature, Value) and feature.dtype in
                                            ("string", "large_string", "binary", "large_binary"))):
        raise ValueError(f"audio_column {audio_column!r} holds {feature}; expected an Audio column, "
                         "{'bytes', 'path'} or {'array', 'sampling_rate'} structs, paths or bytes")
    text_feature = dataset.features[text_column]
    if not (isinstance(text_feature, Value) and text_feature.dtype in ("string", "large_string")):
        raise ValueError(f"text_column {text_column!r} holds {text_feature}, not text")
    n = len(dataset)
    values = [str(v) for v in dataset[id_column]] if id_column else None
    ids = values if values is not None else [str(i) for i in range(n)]
    names = [f"{label}[{i}] ({id_column}={v})" for i, v in enumerate(values)] if values is not None \
        else [f"{label}[{i}]" for i in range(n)]
    rows = dataset.select_columns([audio_column, text_column])
    rows = rows.rename_columns({c: r for c, r in ((audio_column, "audio"), (text_column, "text")) if c != r})
    return rows.add_column("id", ids).add_column("name", names)


def _is_audio_struct(feature: Any) -> bool:
    return isinstance(feature, dict) and ({"bytes", "path"} >= set(feature) > set()
                                          or {"array", "sampling_rate"} <= set(feature))


def _close(key: str, entry: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, [str(k) for k in entry], n=1)
    return f"; did you mean {close[0]!r}?" if close and close[0] != key else ""


# ---- decoder prompts -------------------------------------------------------------------------------------------


def whisper_prompt_ids(tokenizer: Any, language: str | None = None, task: str = "transcribe",
                       timestamps: bool = False) -> list[int]:
    """Whisper's decoder prompt as token ids: ``<|startoftranscript|>`` [``<|en|>`` ``<|transcribe|>``]
    ``<|notimestamps|>``.

    ``language=None`` is the prompt of an English-only model (``*.en``: no language or task token);
    a language code ("en", "fr") gives a multilingual model's prompt. Works with any tokenizer that
    knows Whisper's special tokens (WhisperTokenizer, or a ``tokenizer.json`` loaded as is).
    """
    tokens = ["<|startoftranscript|>"]
    if language is not None:
        tokens += [f"<|{language}|>", f"<|{task}|>"]
    if not timestamps:
        tokens.append("<|notimestamps|>")
    return [_special_id(tokenizer, t) for t in tokens]


def end_of_text_ids(tokenizer: Any) -> list[int]:
    """What ends a transcript: the tokenizer's end-of-sequence token (Whisper's ``<|endoftext|>``)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if eos is not None else [_special_id(tokenizer, "<|endoftext|>")]


def _special_id(tokenizer: Any, token: str) -> int:
    index = tokenizer.convert_tokens_to_ids(token)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if index is None or (unknown is not None and index == unknown and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no token {token!r}: give the prompt's token ids explicitly")
    return int(index)


# ---- features and labels ---------------------------------------------------------------------------------------


class _Featurize:
    """The map function of :func:`prepare` (a class, so that datasets can hash it for its cache)."""

    def __init__(self, feature_extractor: Any, tokenizer: Any, prefix_ids: list[int], suffix_ids: list[int],
                 text_prefix: str, on_bad_audio: str, silence_rms: float | None, max_label_length: int | None,
                 trim: bool) -> None:
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.prefix_ids = prefix_ids
        self.suffix_ids = suffix_ids
        self.text_prefix = text_prefix
        self.on_bad_audio = on_bad_audio
        self.silence_rms = silence_rms
        self.max_label_length = max_label_length
        self.trim = trim

    def __call__(self, batch: dict[str, list[Any]], indices: list[int], rank: int | None = None) -> dict[str, list]:
        if rank is not None:  # one of num_proc workers: one thread each, or they fight over the cores
            torch.set_num_threads(1)
        rate = self.feature_extractor.sampling_rate
        window = getattr(self.feature_extractor, "n_samples", None)
        waves, labels, errors = [], [], []
        for i, audio, text, name in zip(indices, batch["audio"], batch["text"], batch.get("name") or
                                        [None] * len(indices), strict=True):
            row = _subject(audio, f"row {i}" if name is None else name)
            try:
                if not isinstance(text, str):
                    raise AudioError(f"{row} has no transcript ({text!r})")
                wave = self._decode(audio, row, rate)
                if window is not None and len(wave) > window:
                    raise AudioError(f"{row} lasts {len(wave) / rate:.2f} s, longer than the feature "
                                     f"extractor's {window / rate:g} s window (its end would be cut off)")
                ids = self.prefix_ids + self._text_ids(text) + self.suffix_ids
                if self.max_label_length is not None and len(ids) > self.max_label_length:
                    raise AudioError(f"{row}: its transcript is {len(ids)} tokens with the prompt, more than "
                                     f"max_label_length={self.max_label_length}")
            except (AudioError, FileNotFoundError) as exc:
                if self.on_bad_audio == "fail":
                    raise AudioError(f"{exc} (on_bad_audio: skip drops such rows, naming them in a warning)") \
                        from None
                waves.append(None)
                labels.append([])
                errors.append(str(exc))
                continue
            except Exception as exc:  # not bad data but a failure all the same: say on which row
                raise RuntimeError(f"{row}: {type(exc).__name__}: {exc}") from exc
            waves.append(wave)
            labels.append(ids)
            errors.append(None)
        good = [w for w in waves if w is not None]
        features = iter(self.feature_extractor(good, sampling_rate=rate, return_tensors="np")["input_features"]
                        if good else [])
        empty = np.zeros((0, 0), np.float32)
        return {
            "input_features": [empty if w is None else _trim(next(features), self.trim) for w in waves],
            "labels": labels,
            "text": [t if isinstance(t, str) else "" for t in batch["text"]],
            "id": [str(x) for x in batch["id"]] if "id" in batch else [str(i) for i in indices],
            "duration": [0.0 if w is None else len(w) / rate for w in waves],
            "error": errors,
        }

    def _decode(self, audio: Any, row: str, rate: int) -> npt.NDArray[np.float32]:
        if isinstance(audio, Mapping) and "array" in audio:
            samples = np.asarray(audio["array"])
            if samples.ndim == 2:  # datasets / torchcodec hold [channels, frames]
                samples = samples.T
            return from_samples(samples, audio.get("sampling_rate"), rate, name=row, silence_rms=self.silence_rms)
        if isinstance(audio, Mapping):
            data, path = audio.get("bytes"), audio.get("path")
        elif isinstance(audio, bytes | bytearray):
            data, path = audio, None
        else:
            data, path = None, audio
        if data is not None:
            return decode_audio(data, rate, name=row, silence_rms=self.silence_rms)
        if path:
            return decode_audio(Path(path), rate, name=row, silence_rms=self.silence_rms)
        raise AudioError(f"{row} has no audio (neither bytes nor a path)")

    def _text_ids(self, text: str) -> list[int]:
        text = text.strip()
        return list(self.tokenizer(self.text_prefix + text, add_special_tokens=False)["input_ids"]) if text else []


def _subject(audio: Any, row: str | None) -> str:
    """How errors name a row: its name, and the audio file when the row holds a path rather than bytes."""
    path = audio if isinstance(audio, str) else audio.get("path") if isinstance(audio, Mapping) else None
    if path and not (isinstance(audio, Mapping) and audio.get("bytes") is not None):
        return f"{row}: audio file {path}" if row else f"audio file {path}"
    return row or "a row"


def _trim(features: npt.NDArray[np.float32], trim: bool) -> npt.NDArray[np.float32]:
    """Drop the trailing frames that repeat the last one (the padding after the audio).

    :func:`pad_features` restores them by repeating the last frame kept."""
    if not trim:
        return features
    differs = np.flatnonzero((features != features[:, -1:]).any(axis=0))
    keep = differs[-1] + 2 if len(differs) else 1
    return features[:, :keep]


def prepare(dataset: Any, feature_extractor: Any, tokenizer: Any, *, prefix_ids: Sequence[int] | None = None,
            suffix_ids: Sequence[int] | None = None, text_prefix: str = " ", num_proc: int = 1,
            on_bad_audio: Literal["fail", "skip"] = "fail", silence_rms: float | None = None,
            max_label_length: int | None = None, trim: bool = True, cache_dir: str | Path | None = None,
            batch_size: int = 16, progress: bool = True, desc: str = "Speech features") -> Any:
    """Decode, featurise and tokenise ``dataset`` (rows of :data:`ROW_COLUMNS`, e.g. from :func:`read_speech`).

    Returns a :class:`datasets.Dataset` with, per row:

    - ``input_features``: ``[n_mels, frames]`` float32 log-mel features from ``feature_extractor``
      (the model's own, e.g. ``AutoProcessor.from_pretrained(whisper).feature_extractor``), at its
      sampling rate. With ``trim`` (default) the trailing frames that repeat the last one — the
      features of the zero padding up to 30 s — are not stored; :func:`pad_features` (and
      :func:`collate_speech`) put them back exactly;
    - ``labels``: ``prefix_ids + tokens(text_prefix + text) + suffix_ids`` — the whole decoder
      sequence, as ``WhisperTokenizer(text)`` gives it: :func:`collate_speech` makes the decoder
      input and the targets from it;
    - ``text``, ``id``, ``duration`` (seconds).

    Args:
        tokenizer: any Hugging Face tokenizer (called with ``add_special_tokens=False``).
        prefix_ids: the decoder prompt, starting with the decoder start token; default
            ``tokenizer.prefix_tokens`` (a WhisperTokenizer's, for its language and task), else an
            error: :func:`whisper_prompt_ids` gives it for any tokenizer with Whisper's special tokens.
            For a speech LLM (DiVA) give ``[]`` and ``suffix_ids=[]`` with ``text_prefix=""``.
        suffix_ids: default :func:`end_of_text_ids`.
        text_prefix: put before the transcript: Whisper writes a space before the first word.
        num_proc: worker processes (``datasets.map``); errors raised in a worker name the row.
        on_bad_audio: "fail" raises :class:`~potstill.audio.AudioError` at the first unusable row,
            naming it; "skip" drops every unusable row and logs one WARNING with the count and the
            first few rows and reasons.
        silence_rms: refuse audio at or below this RMS amplitude as silent (None: no check).
        max_label_length: refuse transcripts longer than this many tokens with the prompt
            (Whisper: ``config.max_target_positions``, 448).
        cache_dir: where datasets writes the result (``speech-FINGERPRINT.arrow``), so that a rerun
            on the same rows with the same settings reads it instead of decoding again. None: datasets'
            own cache beside the source's Arrow files (rows read from folders and manifests live in
            memory and are not cached then).
    """
    import datasets
    from datasets import Features, Value
    from datasets.fingerprint import Hasher

    List = getattr(datasets, "List", datasets.Sequence)  # datasets < 4 calls it Sequence

    if on_bad_audio not in ("fail", "skip"):
        raise ValueError(f"on_bad_audio must be 'fail' or 'skip', got {on_bad_audio!r}")
    missing = [c for c in ("audio", "text") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"prepare needs the columns {ROW_COLUMNS} (from read_speech / from_dataset); "
                         f"missing: {', '.join(missing)}")
    if prefix_ids is None:
        if not hasattr(tokenizer, "prefix_tokens"):
            raise ValueError("give prefix_ids (the decoder prompt, e.g. whisper_prompt_ids(tokenizer)): "
                             "this tokenizer does not define one")
        prefix_ids = list(tokenizer.prefix_tokens)
    suffix_ids = end_of_text_ids(tokenizer) if suffix_ids is None else suffix_ids
    featurize = _Featurize(feature_extractor, tokenizer, [int(i) for i in prefix_ids], [int(i) for i in suffix_ids],
                           text_prefix, on_bad_audio, silence_rms, max_label_length, trim)
    features = Features({"input_features": List(List(Value("float32"))), "labels": List(Value("int32")),
                         "text": Value("string"), "id": Value("string"), "duration": Value("float32"),
                         "error": Value("string")})
    cache: dict[str, Any] = {}
    if cache_dir is not None:
        fingerprint = Hasher.hash([dataset._fingerprint, featurize, "potstill.speech/1"])
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache = {"cache_file_name": str(Path(cache_dir) / f"speech-{fingerprint}.arrow"),
                 "new_fingerprint": fingerprint}
    with _progress_bars(progress):
        out = dataset.map(featurize, with_indices=True, with_rank=True, batched=True, batch_size=batch_size,
                          num_proc=num_proc if num_proc > 1 else None, remove_columns=dataset.column_names,
                          features=features, desc=desc, **cache)
    errors = out["error"]
    bad = [(i, e) for i, e in enumerate(errors) if e is not None]
    if bad:
        named = "; ".join(e for _, e in bad[:_NAMED_IN_WARNING])
        more = f"; … and {len(bad) - _NAMED_IN_WARNING} more" if len(bad) > _NAMED_IN_WARNING else ""
        logger.warning("skipped %d of %d rows whose audio or transcript cannot be used: %s%s",
                       len(bad), len(out), named, more)
        dropped = {i for i, _ in bad}
        out = out.select([i for i in range(len(out)) if i not in dropped])
        if len(out) == 0:
            raise AudioError(f"none of the {len(errors)} rows can be used (first: {bad[0][1]})")
    return out.remove_columns("error")


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    (ds_logging.enable_progress_bar if enabled else ds_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (ds_logging.enable_progress_bar if was else ds_logging.disable_progress_bar)()


def read_and_prepare(spec: SpeechDataSpec, feature_extractor: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """:func:`read_speech` then :func:`prepare` with the spec's ``num_proc``, ``on_bad_audio`` and ``silence_rms``."""
    return prepare(read_speech(spec), feature_extractor, tokenizer, num_proc=spec.num_proc,
                   on_bad_audio=spec.on_bad_audio, silence_rms=spec.silence_rms, **kwargs)


# ---- batches ---------------------------------------------------------------------------------------------------


def pad_features(features: Sequence[Any], num_frames: int = 3000) -> torch.Tensor:
    """Stack ``[n_mels, frames]`` features into ``[B, n_mels, num_frames]``, repeating each one's last frame.

    This restores exactly what the feature extractor gave before :func:`prepare` trimmed it
    (Whisper: ``num_frames=3000``, ``feature_extractor.nb_max_frames``).
    """
    arrays = [np.asarray(f, dtype=np.float32) for f in features]
    mels = {a.shape[0] for a in arrays if a.ndim == 2}
    if len(mels) != 1 or any(a.ndim != 2 or a.shape[1] == 0 for a in arrays):
        raise ValueError(f"features must all be [n_mels, frames] with the same n_mels, got "
                         f"{sorted({a.shape for a in arrays})}")
    longest = max(a.shape[1] for a in arrays)
    if longest > num_frames:
        raise ValueError(f"features of {longest} frames do not fit num_frames={num_frames}")
    out = np.empty((len(arrays), mels.pop(), num_frames), np.float32)
    for row, a in zip(out, arrays, strict=True):
        row[:, : a.shape[1]] = a
        row[:, a.shape[1]:] = a[:, -1:]
    return torch.from_numpy(out)


def collate_speech(examples: Sequence[Mapping[str, Any]], *, pad_token_id: int, num_frames: int = 3000
                   ) -> dict[str, torch.Tensor]:
    """Pad prepared rows into a Whisper batch.

    Returns ``input_features`` ``[B, n_mels, num_frames]`` (:func:`pad_features`), and from each
    row's decoder sequence ``labels = s`` (prompt + text + end-of-text): ``decoder_input_ids = s[:-1]``
    padded with ``pad_token_id``, ``labels = s[1:]`` padded with -100, and ``decoder_attention_mask``
    (1 on real tokens). The decoder input is built here rather than by the model shifting the labels,
    so that it is explicit which positions are trained: every token after ``<|startoftranscript|>``,
    the prompt's task tokens and ``<|endoftext|>`` included (as Whisper fine-tuning does).
    """
    if not examples:
        raise ValueError("collate_speech got no examples")
    sequences = [list(map(int, e["labels"])) for e in examples]
    if any(len(s) < 2 for s in sequences):
        raise ValueError("every decoder sequence needs at least a start token and one target")
    length = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, s in enumerate(sequences):
        n = len(s) - 1
        inputs[row, :n] = torch.tensor(s[:-1])
        labels[row, :n] = torch.tensor(s[1:])
        mask[row, :n] = 1
    return {"input_features": pad_features([e["input_features"] for e in examples], num_frames),
            "decoder_input_ids": inputs, "decoder_attention_mask": mask, "labels": labels}


__all__ = [
    "DIGITS", "ROW_COLUMNS", "SpeechDataSpec", "collate_speech", "end_of_text_ids", "from_dataset", "pad_features",
    "prepare", "read_and_prepare", "read_dataset", "read_fsdd", "read_ljspeech", "read_manifest", "read_speech",
    "select_rows", "whisper_prompt_ids",
]
