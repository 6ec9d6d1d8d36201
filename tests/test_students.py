"""Students cut from teachers: generic over BERT, GPT-2, Llama and Whisper, reloadable, exact copies."""

from __future__ import annotations

import pytest
import torch
import transformers

from potstill.cli import main
from potstill.students import (
    block_influence,
    find_layer_stacks,
    make_student,
    select_layers,
    transfer_vocabulary,
)

SMALL = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}


def bert():
    return transformers.BertModel(transformers.BertConfig(vocab_size=50, num_hidden_layers=6, **SMALL))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_layer=4, n_embd=32, n_head=4))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=50, num_hidden_layers=4,
                                                                  num_key_value_heads=4, **SMALL))


def whisper():
    config = transformers.WhisperConfig(vocab_size=60, d_model=32, encoder_layers=4, decoder_layers=4,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                                        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0)
    return transformers.WhisperForConditionalGeneration(config)


def test_layer_stacks_are_found_by_shape_not_by_table():
    assert [(s.path, s.config_field) for s in find_layer_stacks(bert())] == [("encoder.layer", "num_hidden_layers")]
    # GPT-2 spells it n_layer; transformers also answers to num_hidden_layers for it
    assert [(s.path, s.size) for s in find_layer_stacks(gpt2())] == [("transformer.h", 4)]
    assert [(s.path, s.config_field) for s in find_layer_stacks(llama())] == [("model.layers", "num_hidden_layers")]
    assert [(s.path, s.config_field) for s in find_layer_stacks(whisper())] == [
        ("model.encoder.layers", "encoder_layers"), ("model.decoder.layers", "decoder_layers")]


@pytest.mark.parametrize(("build", "layers"), [(bert, [0, 2, 5]), (gpt2, "every-other"), (llama, "first-last")])
def test_student_keeps_the_chosen_layers_and_reloads(tmp_path, build, layers):
    torch.manual_seed(0)
    teacher = build()
    student = make_student(teacher, layers).eval()  # no dropout: compare outputs exactly
    stack = find_layer_stacks(teacher)[0]
    kept = select_layers(stack.size, layers)
    new = student.get_submodule(stack.path)
    old = teacher.get_submodule(stack.path)
    assert len(new) == len(kept) == getattr(student.config, stack.config_field)
    for i, j in enumerate(kept):
        for (name, a), (_, b) in zip(new[i].state_dict().items(), old[j].state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    student.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = (student.base_model if hasattr(student, "base_model") else student)(input_ids=ids)
        got = reloaded(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)


def test_keeping_every_layer_changes_nothing():
    torch.manual_seed(0)
    teacher = llama().eval()
    student = make_student(teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_whisper_decoder_only_as_distil_whisper_does(tmp_path):
    torch.manual_seed(0)
    teacher = whisper()
    student = make_student(teacher, {"decoder": "first-last"})
    assert student.config.encoder_layers == 4 and student.config.decoder_layers == 2
    assert torch.equal(student.model.decoder.layers[1].fc1.weight, teacher.model.decoder.layers[3].fc1.weight)
    teacher.save_pretrained(tmp_path / "teacher")
    assert main(["init-student", "--teacher", str(tmp_path / "teacher"), "--layers", "0,-1", "--stack", "decoder",
                 "--out", str(tmp_path / "student")]) == 0
    reloaded = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "student")
    assert reloaded.config.decoder_layers == 2 and len(reloaded.model.decoder.layers) == 2
    features = torch.randn(1, 8, 32)
    with torch.no_grad():
        out = reloaded(input_features=features, decoder_input_ids=torch.tensor([[1, 5, 6]]))
    assert out.logits.shape == (1, 3, 60)


def test_bad_selections_are_clear_errors():
    with pytest.raises(ValueError, match=r"selection of 0\.\.3"):
        select_layers(4, [0, 7])
    with pytest.raises(ValueError, match="repeat"):
        select_layers(4, [1, 1])
    with pytest.raises(ValueError, match="no layer stack named"):
        make_student(llama(), {"decoder": [0]})


def test_block_influence_is_the_turn_of_the_hidden_state_on_real_positions():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, num_hidden_layers=6, initializer_range=0.3, **SMALL)
    model = transformers.BertModel(config).eval()  # large weights: every layer turns the state a lot
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding must not count
    mask[2, 2:] = 0
    influence = block_influence(model, [{"input_ids": ids, "attention_mask": mask}])["encoder.layer"]
    with torch.no_grad():  # independent reference: BERT's hidden states are the layers' inputs and outputs
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    keep = mask.bool()
    expected = [(1 - torch.nn.functional.cosine_similarity(states[i][keep].double(), states[i + 1][keep].double(),
                                                            dim=-1)).mean().item() for i in range(6)]
    assert min(expected) > 0.05
    assert influence == pytest.approx(expected, rel=1e-6)


def test_influence_keeps_the_layers_that_do_something():
    torch.manual_seed(0)
    teacher = llama().eval()
    for i in (1, 2):  # no attention or MLP output: these layers pass the hidden state through unchanged
        teacher.model.layers[i].self_attn.o_proj.weight.data.zero_()
        teacher.model.layers[i].mlp.down_proj.weight.data.zero_()
    ids = torch.randint(0, 50, (2, 9))
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    assert block_influence(teacher, calibration)["model.layers"][1:3] == pytest.approx([0.0, 0.0], abs=1e-9)
    student = make_student(teacher, "influence:2", calibration).eval()
    assert student.config.num_hidden_layers == 2
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    with torch.no_grad():  # the dropped layers were identities: the student computes what the teacher does
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
    with pytest.raises(ValueError, match="give calibration batches"):
        make_student(teacher, "influence:2")
    with pytest.raises(ValueError, match="keep between 1 and 4"):
        make_student(teacher, "influence:5", calibration)
    with pytest.raises(ValueError, match=r"unknown layer selection 'every_other'.*influence:N"):
        make_student(teacher, "every_other")


def test_init_student_measures_influence_on_text(tmp_path):
    from potstill.data import VENDORED_TEXT
    from potstill.data.text import read_text
    from potstill.tasks.lm_data import train_tokenizer

    tokenizer = train_tokenizer([read_text(VENDORED_TEXT)], 300)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), num_hidden_layers=4, num_key_value_heads=4, initializer_range=0.2, **SMALL))
    teacher.model.layers[1].self_attn.o_proj.weight.data.mul_(1e-3)  # layer 1 barely does anything
    teacher.model.layers[1].mlp.down_proj.weight.data.mul_(1e-3)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    for extra in ([], ["--calibration", str(tmp_path / "calibration.txt")]):
        (tmp_path / "calibration.txt").write_text(read_text(VENDORED_TEXT)[-20_000:])
        assert main(["init-student", "--teacher", str(tmp_path / "teacher"), "--layers", "influence:3",
                     "--out", str(tmp_path / "student"), *extra]) == 0
        student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
        for i, j in enumerate([0, 2, 3]):
            assert torch.equal(student.model.layers[i].mlp.up_proj.weight, teacher.model.layers[j].mlp.up_proj.weight)
    (tmp_path / "calibration.txt").write_text("too short")
    assert main(["init-student", "--teacher", str(tmp_path / "teacher"), "--layers", "influence:3",
                 "--out", str(tmp_path / "other"), "--calibration", str(tmp_path / "calibration.txt")]) == 2


@pytest.mark.parametrize("head", ["tied", "untied", "untied with bias"])
def test_vocabulary_transfer_gives_each_new_token_the_teachers_rows_for_its_text(head):
    from potstill.data import VENDORED_TEXT
    from potstill.data.text import read_text
    from potstill.tasks.lm_data import train_tokenizer

    text = read_text(VENDORED_TEXT)
    teacher_tok, student_tok = train_tokenizer([text], 1000), train_tokenizer([text[: len(text) // 3]], 400)
    torch.manual_seed(0)
    if head == "untied with bias":  # Phi's output head has a bias
        model = transformers.PhiForCausalLM(transformers.PhiConfig(
            vocab_size=len(teacher_tok) + 24, num_hidden_layers=2, tie_word_embeddings=False, **SMALL))
        with torch.no_grad():
            model.lm_head.bias.normal_()
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(teacher_tok) + 24, num_hidden_layers=2, num_key_value_heads=4,  # 24 padding rows
            tie_word_embeddings=head == "tied", **SMALL))
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    bias = model.get_output_embeddings().bias
    old_bias = None if bias is None else bias.detach().clone()
    fallback = transfer_vocabulary(model, teacher_tok, student_tok)
    assert fallback == 0  # two byte-level BPEs: every token is shared or spelled by the teacher's
    assert model.config.vocab_size == len(student_tok) == model.get_output_embeddings().out_features
    assert model.config.eos_token_id == student_tok.eos_token_id  # the student's own special ids
    new_embeddings, new_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (new_head.data_ptr() == new_embeddings.data_ptr()) == (head == "tied")
    teacher_vocab = teacher_tok.get_vocab()
    shared = spelled = 0
    for token, raw in enumerate(student_tok.convert_ids_to_tokens(list(range(len(student_tok))))):
        if raw in teacher_vocab:  # e.g. the 256 byte tokens and common words: the teacher's own row
            pieces, shared = [teacher_vocab[raw]], shared + 1
        else:  # a merge only the student has: the mean of the teacher's rows for its text
            pieces, spelled = teacher_tok.encode(student_tok.decode([token]), add_special_tokens=False), spelled + 1
            assert len(pieces) > 1
        torch.testing.assert_close(new_embeddings[token], old_embeddings[pieces].mean(0))
        torch.testing.assert_close(new_head[token], old_head[pieces].mean(0))
        if old_bias is not None:
            torch.testing.assert_close(model.get_output_embeddings().bias[token], old_bias[pieces].mean(0))
    assert shared > 256 and spelled > 5  # both cases are exercised
    ids = torch.tensor([student_tok("To be, or not to be")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == len(student_tok)


def test_a_sentencepiece_token_is_spelled_with_its_leading_space():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from potstill.students import _spelling

    vocab = {"<unk>": 0, "\u2581the": 1, "the": 2, "\u2581": 3, "t": 4, "h": 5, "e": 6}
    sp = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    sp.normalizer = normalizers.Replace(" ", "\u2581")
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()  # decoding "▁the" alone strips its space
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=sp)
    assert tokenizer.decode([1]) == "the"
    assert _spelling(tokenizer, "\u2581the") == " the" and _spelling(tokenizer, "the") == "the"
