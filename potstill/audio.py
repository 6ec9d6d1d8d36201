"""Reading audio for speech tasks: any file libsndfile reads, as mono float32 at the rate a model expects.

Decoding is libsndfile's (through ``soundfile``: WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, …) and
resampling is libsoxr's (through ``soxr``, its "HQ" linear-phase filter); potstill adds only the
checks. A file that cannot serve as training audio — missing, empty, not audio, cut short,
corrupt, silent of samples, holding NaN/Inf — raises :class:`AudioError` (or ``FileNotFoundError``)
with the file's path in the message, so one bad file in a data set of thousands is found at once.
"""

from __future__ import annotations

import logging
import re
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


def load_audio(path: str | Path, sample_rate: int = 16000) -> npt.NDArray[np.float32]:
    """Read ``path`` as a 1-D float32 array of mono samples at ``sample_rate`` Hz.

    Several channels are averaged into one. A file at another rate is resampled (libsoxr, HQ)
    and an INFO line on the ``potstill.audio`` logger names the file and both rates.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        AudioError: ``path`` is not a file, is empty, is not audio libsndfile can read, is
            truncated or corrupt, holds no samples, or holds NaN/Inf samples.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file {path} does not exist")
    if not path.is_file():
        raise AudioError(f"audio file {path} is not a file")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file {path} is empty (0 bytes)")
    try:
        with sf.SoundFile(path) as f:
            _check_complete(path, f.extra_info)
            rate = f.samplerate
            samples = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioError(f"audio file {path} cannot be decoded: it is corrupt, truncated or not audio "
                         f"(libsndfile: {exc.error_string})") from None
    if samples.shape[0] == 0:
        raise AudioError(f"audio file {path} holds no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"audio file {path} holds NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sample_rate:
        logger.info("%s: resampled from %d Hz to %d Hz", path, rate, sample_rate)
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_complete(path: Path, header_log: str) -> None:
    """Refuse a file whose audio data stops before its header says it ends."""
    for chunk, declared, present in _SHORT_CHUNK.findall(header_log):
        if int(declared) > int(present) and int(declared) not in _UNKNOWN_LENGTH:
            raise AudioError(f"audio file {path} is truncated: its {chunk!r} chunk declares {declared} bytes "
                             f"but only {present} are present")
