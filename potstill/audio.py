"""Reading audio for speech tasks: any file libsndfile reads, as mono float32 at the rate a model expects.

Decoding is libsndfile's (through ``soundfile``: WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, …) and
resampling is libsoxr's (through ``soxr``, its "HQ" linear-phase filter); potstill adds only the
checks. A file or a data set's audio bytes that cannot serve as training audio — missing, empty,
not audio, cut short, corrupt, holding no samples or NaN/Inf, or (when asked) silent — raises
:class:`AudioError` (or ``FileNotFoundError``) naming the file or the row, so one bad recording in
a data set of thousands is found at once."""

from __future__ import annotations

import io
import logging
import re
from os import PathLike
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

#: a chunk in libsndfile's header log that the file holds fewer bytes of than its header declares,
#: e.g. "data : 32000 (should be 15978)" for a WAV cut short (libsndfile itself reads what is there)
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
#: data sizes that mean "unknown length" (written by streaming encoders), not a promise of bytes
_UNKNOWN_LENGTH = {0, 0xFFFFFFFF, 0x7FFFFFFF}


class AudioError(ValueError):
    """An audio file that cannot be used: the message names the file and what is wrong with it."""


#: what :func:`decode_audio` reads: the bytes of an audio file (as a data set's audio column holds them) or a path
AudioSource = bytes | bytearray | memoryview | str | PathLike[str]


def load_audio(path: str | PathLike[str], sample_rate: int = 16000, *,
               silence_rms: float | None = None) -> npt.NDArray[np.float32]:
    """Read the file at ``path`` as a 1-D float32 array of mono samples at ``sample_rate`` Hz.

    The same as :func:`decode_audio` on a path; errors name the file.
    """
    return decode_audio(Path(path), sample_rate, silence_rms=silence_rms)


def decode_audio(source: AudioSource, sample_rate: int = 16000, *, name: str | None = None,
                 silence_rms: float | None = None) -> npt.NDArray[np.float32]:
    """Decode ``source`` (a file's bytes, or a path) to a 1-D float32 array of mono samples at ``sample_rate`` Hz.

    Several channels are averaged into one. Audio at another rate is resampled (libsoxr, HQ)
    and an INFO line on the ``potstill.audio`` logger names the source and both rates.

    Args:
        source: the bytes of an audio file in any format libsndfile reads (an in-memory buffer,
            nothing is written to disk), or the path of one.
        sample_rate: the rate the samples are returned at.
        name: what error messages call the source, e.g. ``"train[17] (segment_id=abc)"``;
            default ``"audio file PATH"`` for a path and ``"audio bytes"`` for bytes.
        silence_rms: if set, audio whose root-mean-square amplitude (full scale = 1) is at or
            below this is refused as silent; ``0.0`` refuses only all-zero audio.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        AudioError: ``source`` is not a file, is empty, is not audio libsndfile can read, is
            truncated or corrupt, holds no samples, holds NaN/Inf samples, or is silent.
    """
    _check_arguments(sample_rate, silence_rms)
    if isinstance(source, bytes | bytearray | memoryview):
        name = name or "audio bytes"
        if len(source) == 0:
            raise AudioError(f"{name} is empty (0 bytes)")
        opened: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        name = name or f"audio file {path}"
        if not path.exists():
            raise FileNotFoundError(f"{name} does not exist")
        if not path.is_file():
            raise AudioError(f"{name} is not a file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name} is empty (0 bytes)")
        opened = path
    try:
        with sf.SoundFile(opened) as f:
            _check_complete(name, f.extra_info)
            rate = f.samplerate
            samples = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioError(f"{name} cannot be decoded: it is corrupt, truncated or not audio "
                         f"(libsndfile: {exc.error_string})") from None
    return from_samples(samples, rate, sample_rate, name=name, silence_rms=silence_rms)


def from_samples(samples: npt.ArrayLike, rate: int, sample_rate: int = 16000, *, name: str = "audio samples",
                 silence_rms: float | None = None) -> npt.NDArray[np.float32]:
    """Check decoded samples and bring them to mono float32 at ``sample_rate`` Hz.

    ``samples`` is ``[frames]`` or ``[frames, channels]`` (soundfile's layout) at ``rate`` Hz;
    the checks and the errors are :func:`decode_audio`'s. Integer samples are scaled to [-1, 1)
    as libsndfile does (int16 by 1/32768).
    """
    _check_arguments(sample_rate, silence_rms)
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise AudioError(f"{name} has no valid sampling rate: {rate!r}")
    samples = np.asarray(samples)
    if np.issubdtype(samples.dtype, np.signedinteger):
        samples = samples / np.float32(-np.iinfo(samples.dtype).min)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"{name} holds samples of type {samples.dtype}, not float or signed integer")
    samples = samples.astype(np.float32, copy=False)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise AudioError(f"{name} holds samples of shape {samples.shape}, not [frames] or [frames, channels]")
    if samples.shape[0] == 0 or samples.shape[1] == 0:
        raise AudioError(f"{name} holds no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name} holds NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if silence_rms is not None:
        rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
        if rms <= silence_rms:
            raise AudioError(f"{name} is silent: its RMS amplitude is {rms:.3g}, "
                             f"at or below silence_rms={silence_rms:g}")
    if rate != sample_rate:
        logger.info("%s: resampled from %d Hz to %d Hz", name, rate, sample_rate)
        mono = soxr.resample(mono, int(rate), sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_arguments(sample_rate: int, silence_rms: float | None) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
    if silence_rms is not None and not silence_rms >= 0:
        raise ValueError(f"silence_rms must be a non-negative RMS amplitude (or None), got {silence_rms!r}")


def _check_complete(name: str, header_log: str) -> None:
    """Refuse a file whose audio data stops before its header says it ends."""
    for chunk, declared, present in _SHORT_CHUNK.findall(header_log):
        if int(declared) > int(present) and int(declared) not in _UNKNOWN_LENGTH:
            raise AudioError(f"{name} is truncated: its {chunk!r} chunk declares {declared} bytes "
                             f"but only {present} are present")
