"""Students cut from teachers: generic over BERT, GPT-2, Llama and Whisper, reloadable, exact copies."""

from __future__ import annotations

import pytest
import torch
import transformers

from potstill.cli import main
from potstill.students import find_layer_stacks, make_student, select_layers

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
