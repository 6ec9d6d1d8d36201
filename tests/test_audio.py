"""load_audio: mono float32 at the model's rate, resampling that keeps the signal, and a clear error per bad file."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import soundfile as sf

from potstill.audio import AudioError, decode_audio, from_samples, load_audio


def tone(frequency: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def test_mono_at_the_requested_rate_is_read_as_is(tmp_path, caplog):
    path = tmp_path / "a.wav"
    x = tone(440, 16000)
    sf.write(path, x, 16000, subtype="FLOAT")
    with caplog.at_level(logging.INFO, logger="potstill.audio"):
        y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(y, x)
    assert not caplog.records  # nothing resampled, nothing logged


def test_stereo_is_mixed_down_to_the_mean_of_the_channels(tmp_path):
    path = tmp_path / "stereo.flac"
    left, right = tone(440, 16000), tone(1000, 16000, amplitude=0.25)
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_24")
    y = load_audio(path)
    assert y.shape == left.shape
    np.testing.assert_allclose(y, (left + right) / 2, atol=2**-22)  # 24-bit quantisation


def test_another_rate_is_resampled_keeping_frequency_amplitude_and_phase(tmp_path, caplog):
    path = tmp_path / "cd.wav"
    sf.write(path, np.stack([tone(440, 44100), tone(440, 44100)], axis=1), 44100, subtype="FLOAT")
    with caplog.at_level(logging.INFO, logger="potstill.audio"):
        y = load_audio(path, sample_rate=16000)
    assert [r.getMessage() for r in caplog.records] == [f"audio file {path}: resampled from 44100 Hz to 16000 Hz"]
    assert y.dtype == np.float32 and y.shape == (16000,)
    # 1 s at 16 kHz: FFT bins are 1 Hz apart, so a 440 Hz sine puts its energy in bin 440
    power = np.abs(np.fft.rfft(y)) ** 2
    assert power.argmax() == 440
    assert power[438:443].sum() / power.sum() > 0.999
    # and away from the edges (filter start-up) it is the 440 Hz sine sampled at 16 kHz: same amplitude and phase
    reference = tone(440, 16000)
    np.testing.assert_allclose(y[400:-400], reference[400:-400], atol=1e-3)


def test_upsampling_keeps_the_sine_too(tmp_path):
    path = tmp_path / "phone.wav"
    sf.write(path, tone(300, 8000), 8000, subtype="FLOAT")
    y = load_audio(path, sample_rate=16000)
    assert y.shape == (16000,)
    assert np.abs(np.fft.rfft(y)).argmax() == 300
    np.testing.assert_allclose(y[400:-400], tone(300, 16000)[400:-400], atol=1e-3)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(FileNotFoundError, match=re.escape(f"audio file {path} does not exist")):
        load_audio(path)


def test_a_folder_is_not_audio(tmp_path):
    with pytest.raises(AudioError, match=re.escape(f"audio file {tmp_path} is not a file")):
        load_audio(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=re.escape(f"audio file {path} is empty (0 bytes)")):
        load_audio(path)


def test_a_text_file_is_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are meeting notes, not a recording\n" * 20)
    with pytest.raises(AudioError, match=re.escape(f"audio file {path} cannot be decoded")) as error:
        load_audio(path)
    assert "Format not recognised" in str(error.value)


def test_a_wav_cut_short_is_refused_not_read_in_part(tmp_path):
    whole = tmp_path / "whole.wav"
    sf.write(whole, tone(440, 16000), 16000, subtype="PCM_16")  # 44-byte header + 32,000 bytes of samples
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:16022])
    expected = f"audio file {cut} is truncated: its 'data' chunk declares 32000 bytes but only 15978 are present"
    with pytest.raises(AudioError, match=re.escape(expected)):
        load_audio(cut)
    assert load_audio(whole).shape == (16000,)


def test_a_flac_cut_short_is_refused(tmp_path):
    whole = tmp_path / "whole.flac"
    sf.write(whole, tone(440, 16000), 16000)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(AudioError, match=re.escape(f"audio file {cut} cannot be decoded: it is corrupt, truncated")):
        load_audio(cut)


def test_a_corrupt_header_is_refused(tmp_path):
    path = tmp_path / "corrupt.ogg"
    sf.write(path, tone(440, 16000), 16000, format="OGG")
    data = bytearray(path.read_bytes())
    data[20:80] = bytes(60)  # the Ogg page and Vorbis identification header zeroed
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match=re.escape(f"audio file {path} cannot be decoded")):
        load_audio(path)


def test_a_header_without_samples_is_refused(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=re.escape(f"audio file {path} holds no audio samples")):
        load_audio(path)


def test_nan_samples_are_refused(tmp_path):
    path = tmp_path / "nan.wav"
    x = tone(440, 16000)
    x[1234] = np.nan
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=re.escape(f"audio file {path} holds NaN or infinite samples")):
        load_audio(path)


@pytest.mark.parametrize("rate", [0, -16000, 16000.0, True])
def test_the_sample_rate_must_be_a_positive_integer(tmp_path, rate):
    with pytest.raises(ValueError, match="sample_rate must be a positive number of Hz"):
        load_audio(tmp_path / "any.wav", sample_rate=rate)


# ---- bytes (a data set's audio column), samples, silence ----------------------------------------------------------


def wav_bytes(x: np.ndarray, rate: int, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, x, rate, format="WAV", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_bytes_decode_as_the_same_file_does(tmp_path, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, np.stack([tone(440, 22050), tone(880, 22050)], axis=1), 22050, format=fmt)
    from_bytes = decode_audio(path.read_bytes(), 16000, name="train[3]")
    np.testing.assert_array_equal(from_bytes, load_audio(path, 16000))
    np.testing.assert_array_equal(from_bytes, decode_audio(bytearray(path.read_bytes()), 16000))
    assert from_bytes.shape == (16000,)


def test_bad_bytes_are_named_by_the_given_name():
    whole = wav_bytes(tone(440, 16000), 16000, subtype="PCM_16")
    name = "train[17] (segment_id=abc)"
    with pytest.raises(AudioError, match=re.escape(f"{name} is empty (0 bytes)")):
        decode_audio(b"", name=name)
    with pytest.raises(AudioError, match=re.escape(f"{name} cannot be decoded: it is corrupt, truncated or not audio "
                                                   "(libsndfile: Format not recognised.)")):
        decode_audio(b"not audio at all" * 10, name=name)
    with pytest.raises(AudioError, match=re.escape(f"{name} is truncated: its 'data' chunk declares 32000 bytes but "
                                                   "only 15978 are present")):
        decode_audio(whole[:16022], name=name)
    with pytest.raises(AudioError, match=re.escape("audio bytes holds no audio samples")):
        decode_audio(wav_bytes(np.zeros(0, np.float32), 16000))


def test_silence_is_refused_only_when_asked(tmp_path):
    quiet = tone(440, 16000, amplitude=1e-4)  # RMS 7.1e-5: -83 dBFS
    path = tmp_path / "quiet.wav"
    sf.write(path, quiet, 16000, subtype="FLOAT")
    assert load_audio(path).shape == (16000,)
    with pytest.raises(AudioError, match=re.escape(f"audio file {path} is silent: its RMS amplitude is 7.07e-05, "
                                                   "at or below silence_rms=0.0001")):
        load_audio(path, silence_rms=1e-4)
    assert load_audio(path, silence_rms=5e-5).shape == (16000,)
    zeros = wav_bytes(np.zeros(800, np.float32), 8000)
    expected = "row 4 is silent: its RMS amplitude is 0, at or below silence_rms=0"
    with pytest.raises(AudioError, match=re.escape(expected)):
        decode_audio(zeros, name="row 4", silence_rms=0.0)
    with pytest.raises(ValueError, match="silence_rms must be a non-negative"):
        decode_audio(zeros, silence_rms=-1.0)


def test_samples_are_checked_mixed_and_resampled_as_decoded_files_are():
    left, right = tone(440, 8000), tone(1000, 8000, amplitude=0.25)
    stereo = np.stack([left, right], axis=1)
    via_file = decode_audio(wav_bytes(stereo, 8000, subtype="FLOAT"))
    np.testing.assert_array_equal(from_samples(stereo, 8000), via_file)
    # int16 samples are scaled as libsndfile scales them
    pcm = (left * 32767).astype(np.int16)
    np.testing.assert_array_equal(from_samples(pcm, 8000, 8000), decode_audio(wav_bytes(pcm, 8000, subtype="PCM_16"),
                                                                               8000))
    with pytest.raises(AudioError, match=re.escape("eval[2] holds NaN or infinite samples")):
        from_samples(np.array([0.1, np.inf], np.float32), 8000, name="eval[2]")
    with pytest.raises(AudioError, match=re.escape("eval[2] holds no audio samples")):
        from_samples(np.zeros(0, np.float32), 8000, name="eval[2]")
    with pytest.raises(AudioError, match=re.escape("eval[2] has no valid sampling rate: None")):
        from_samples(left, None, name="eval[2]")
