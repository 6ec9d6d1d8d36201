"""Masked-LM distillation (DistilBERT's recipe): masking statistics, masks across epochs and resumes,
exact gradient accumulation over masked tokens, students cut from the teacher, the metrics."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForMaskedLM

from potstill.config import RecipeError, TrainSpec
from potstill.distill import _batch_preparation, distill
from potstill.engine import Engine, make_loader
from potstill.losses import IGNORE_INDEX
from potstill.objective import Objective, Term
from potstill.recipes import load_recipe
from potstill.signals import forward_signals
from potstill.students import init_student
from potstill.tasks import MaskedLM
from potstill.tasks.masked_lm import DynamicMasking, hidden_signal
from potstill.tasks.mlm_data import NO_WORD, Masker, example_seed

MASK_ID, SPECIAL = 4, torch.tensor([0, 2, 3, 4])  # [PAD], [CLS], [SEP], [MASK]; 1 is [UNK]
TINY = ["data.max_length=32", "data.tokenizer.vocab_size=300", "data.max_train_examples=640",
        "data.max_eval_examples=64", "data.pseudo_perplexity_sequences=2",
        "teacher.hidden_size=32", "teacher.num_layers=4", "teacher.num_heads=2", "teacher.intermediate_size=64",
        "teacher.train.epochs=3", "teacher.train.batch_size=32", "teacher.train.learning_rate=5e-3",
        "teacher.train.warmup_steps=0", "train.warmup_steps=0", "train.learning_rate=3e-3",
        "train.epochs=1", "train.batch_size=16", "train.gradient_accumulation_steps=2"]


def synthetic_masker(**kwargs) -> Masker:
    return Masker(MASK_ID, torch.arange(5, 500), SPECIAL, **kwargs)


def sequence(n: int, seed: int) -> torch.Tensor:
    """[CLS] ordinary tokens [SEP]."""
    body = torch.randint(5, 500, (n - 2,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([2]), body, torch.tensor([3])])


def tiny_recipe(tmp_path, *more: str):
    return load_recipe("distilbert", [*TINY, f"output_dir={tmp_path / 'run'}", *more])


# ----- masking --------------------------------------------------------------------------------


def test_masking_statistics_are_berts_15_percent_and_80_10_10():
    masker = synthetic_masker()
    chosen = ordinary = to_mask = to_random = kept = 0
    for i in range(1500):
        ids = sequence(130, i)
        inputs, labels = masker.example(ids, torch.Generator().manual_seed(example_seed(0, 0, i)))
        target = labels != IGNORE_INDEX
        assert not target[[0, -1]].any()  # [CLS] and [SEP] are never targets
        assert torch.equal(labels[target], ids[target])  # a target's label is the original token
        assert torch.equal(inputs[~target], ids[~target])  # nothing else changes
        chosen, ordinary = chosen + target.sum().item(), ordinary + len(ids) - 2
        to_mask += (inputs[target] == MASK_ID).sum().item()
        same = inputs[target] == ids[target]
        kept += same.sum().item()
        to_random += (~same & (inputs[target] != MASK_ID)).sum().item()
        assert torch.isin(inputs[target & (inputs != MASK_ID)], torch.arange(5, 500)).all()
    # 192,000 ordinary tokens: the share's standard error is 0.0008, the split's about 0.002
    assert chosen / ordinary == pytest.approx(0.15, abs=0.005)
    assert to_mask / chosen == pytest.approx(0.8, abs=0.01)
    # a random token equals the original 1 time in 495: it then counts as kept
    assert to_random / chosen == pytest.approx(0.1 * 494 / 495, abs=0.01)
    assert kept / chosen == pytest.approx(0.1 + 0.1 / 495, abs=0.01)


def test_whole_word_masking_chooses_15_percent_of_words_and_all_their_tokens():
    masker = synthetic_masker(whole_word=True)
    chosen_words = words = 0
    for i in range(800):
        g = torch.Generator().manual_seed(1000 + i)
        lengths = torch.randint(1, 4, (40,), generator=g)  # words of 1-3 tokens
        word_ids = torch.cat([torch.tensor([NO_WORD]), torch.arange(40).repeat_interleave(lengths),
                              torch.tensor([NO_WORD])])
        ids = sequence(len(word_ids), i)
        _, labels = masker.example(ids, torch.Generator().manual_seed(i), word_ids)
        target = labels != IGNORE_INDEX
        for w in range(40):
            picked = target[word_ids == w]
            assert picked.all() or not picked.any()  # a word is a target as a whole
            chosen_words += picked.all().item()
        words += 40
    assert chosen_words / words == pytest.approx(0.15, abs=0.01)  # 32,000 words: SE 0.002


def test_a_mask_depends_on_seed_epoch_and_example_not_on_padding_or_batch():
    masker = synthetic_masker()
    rows = [sequence(n, n) for n in (12, 30, 20)]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    keep = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    seeds = [example_seed(0, 0, i) for i in range(3)]
    together, labels = masker.batch(ids, keep, seeds)
    for b, row in enumerate(rows):  # each alone, unpadded: the same mask
        alone, alone_labels = masker.batch(row[None], torch.ones(1, len(row), dtype=torch.long), [seeds[b]])
        assert torch.equal(together[b, : len(row)], alone[0]) and torch.equal(labels[b, : len(row)], alone_labels[0])
        assert (labels[b, len(row):] == IGNORE_INDEX).all() and (together[b, len(row):] == 0).all()
    again, _ = masker.batch(ids, keep, seeds)
    assert torch.equal(again, together)
    next_epoch, _ = masker.batch(ids, keep, [example_seed(0, 1, i) for i in range(3)])
    assert not torch.equal(next_epoch, together)


def test_dynamic_masking_reads_the_epoch_from_the_engines_generator():
    masker = synthetic_masker()
    transform = DynamicMasking(masker, seed=7, batches_per_epoch=8)
    prepare = _batch_preparation(transform, None, 7)  # what a run hands the engine
    from potstill.batch import Batch

    row = sequence(40, 0)
    inputs = {"input_ids": row[None], "attention_mask": torch.ones(1, 40, dtype=torch.long)}
    batch = Batch(inputs, inputs, mask=inputs["attention_mask"], indices=torch.tensor([5]))

    def masked(key: int) -> torch.Tensor:
        return prepare(None, batch, key).student_inputs["input_ids"]

    # batch 3 and batch 6 of epoch 0: example 5 masked alike; in epoch 1 (batch 8 on), afresh
    assert torch.equal(masked(3), masked(6))
    assert not torch.equal(masked(3), masked(8 + 3))
    assert torch.equal(masked(8 + 3), masked(8 + 0))
    expected, _ = masker.batch(row[None], inputs["attention_mask"], [example_seed(7, 1, 5)])
    assert torch.equal(masked(9), expected)


def test_the_tasks_transform_masks_whole_words_of_the_real_tokenizer(tmp_path):
    task = MaskedLM(tiny_recipe(tmp_path, "data.masking.whole_word=true", "data.masking.probability=0.3"),
                    progress=False)
    examples = task.train_set[:64]
    batch = task.batch_transform(task.recipe.student)(task.collate(examples), torch.Generator().manual_seed(3))
    pieces = split = 0
    for example, labels in zip(examples, batch.labels, strict=True):
        target, words = labels != IGNORE_INDEX, example["word_ids"]
        for w in words.unique().tolist():
            if w != NO_WORD:
                picked = target[words == w]
                assert picked.all() or not picked.any()
                pieces += len(picked) > 1 and bool(picked.all())
        split += sum(t.startswith("##") for t in task.tokenizer.convert_ids_to_tokens(example["input_ids"].tolist()))
    assert split > 50 and pieces > 10  # words of several pieces were chosen whole
    assert not (batch.labels[:, 0] != IGNORE_INDEX).any()  # [CLS] never


def test_the_wordpiece_trained_on_the_text_numbers_its_tokens_the_same_every_time():
    """A resumed run trains its tokenizer again: the ids must not move (the trainer orders ties at random)."""
    from potstill.data import VENDORED_TEXT
    from potstill.data.text import read_text
    from potstill.tasks.mlm_data import train_wordpiece

    text = [read_text(VENDORED_TEXT)]
    first = train_wordpiece(text, 300)
    assert all(train_wordpiece(text, 300).get_vocab() == first.get_vocab() for _ in range(3))
    assert first.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = first("First Citizen: speak.")["input_ids"]
    assert first.decode(ids, skip_special_tokens=True) == "first citizen : speak."


# ----- the engine: accumulation and resume ----------------------------------------------------


def tiny_bert(seed: int, layers: int = 2, vocab: int = 500) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForMaskedLM(config).double()


class Examples(torch.utils.data.Dataset):
    """64 sequences of 10-40 tokens (unequal: batches pad differently)."""

    def __init__(self, n: int = 64):
        lengths = torch.randint(10, 41, (n,), generator=torch.Generator().manual_seed(1))
        self.rows = [{"index": i, "input_ids": sequence(int(n), 100 + i)} for i, n in enumerate(lengths)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def collate(examples):
    from potstill.batch import Batch

    ids = torch.nn.utils.rnn.pad_sequence([e["input_ids"] for e in examples], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(e["input_ids"]) for e in examples], batch_first=True)
    inputs = {"input_ids": ids, "attention_mask": mask}
    return Batch(inputs, inputs, mask=mask, indices=torch.tensor([e["index"] for e in examples]))


def triple(kl_positions: str) -> Objective:
    return Objective([Term("kl", 5.0, params={"temperature": 2.0}, ignore_labels=kl_positions == "all"),
                      Term("cross_entropy", 2.0),
                      Term("cosine", 1.0, student="bert", teacher="bert", ignore_labels=True)])


def train_one_step(tmp_path, batch_size: int, accumulation: int, kl_positions: str):
    data = Examples()
    spec = TrainSpec(epochs=1, batch_size=batch_size, gradient_accumulation_steps=accumulation, optimizer="sgd",
                     momentum=0.0, learning_rate=0.5, scheduler="constant", mixed_precision="no")
    transform = DynamicMasking(synthetic_masker(), spec.seed, math.ceil(len(data) / batch_size))
    engine = Engine(Accelerator(cpu=True), spec, tmp_path / f"{batch_size}x{accumulation}", progress=False,
                    log_every=1, prepare_batch=_batch_preparation(transform, None, spec.seed))
    student = tiny_bert(0)
    before = [p.detach().clone() for p in student.parameters()]
    result = engine.fit(student, triple(kl_positions), make_loader(data, batch_size, collate, seed=spec.seed),
                        teacher=tiny_bert(1, layers=4))
    assert result.history[0]["step"] == 1  # one optimiser step
    return [p.detach() for p in result.model.parameters()], before, result.history[0]


@pytest.mark.parametrize("kl_positions", ["all", "masked"])
def test_one_batch_of_64_and_8_accumulated_batches_of_8_give_the_same_update(tmp_path, kl_positions):
    """Dynamic masking on: each term is normalised by its count (masked tokens for the MLM CE, real
    tokens for the cosine and, with kl_positions all, the KL) over the whole accumulated batch."""
    whole, before, row_whole = train_one_step(tmp_path, 64, 1, kl_positions)
    accumulated, _, row_acc = train_one_step(tmp_path, 8, 8, kl_positions)
    assert any(not torch.equal(a, b) for a, b in zip(whole, before, strict=True))  # it did learn
    for a, b in zip(whole, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for key in ("loss", "kl", "cross_entropy", "cosine[bert]"):
        assert row_acc[key] == pytest.approx(row_whole[key], rel=1e-10)


def test_the_whole_batch_reference_is_the_mean_over_masked_and_real_tokens():
    """The one-batch loss is what the objective gives on the whole masked batch at its per-token means."""
    data = Examples()
    batch = collate([data[i] for i in range(64)])
    transform = DynamicMasking(synthetic_masker(), 0, 1)
    masked = _batch_preparation(transform, None, 0)(None, batch, 0)
    student, teacher = tiny_bert(0), tiny_bert(1, layers=4)
    s = forward_signals(student, masked.student_inputs, {"logits", "bert"})
    with torch.no_grad():
        t = forward_signals(teacher, masked.teacher_inputs, {"logits", "bert"})
    out = triple("all")(s, t, labels=masked.labels, mask=masked.mask)
    real, targets = masked.mask.bool(), masked.labels != IGNORE_INDEX
    assert targets.sum() < 0.2 * real.sum()
    ce = torch.nn.functional.cross_entropy(s["logits"][targets], masked.labels[targets])
    kl = torch.nn.functional.kl_div(torch.log_softmax(s["logits"][real] / 2, -1),
                                    torch.log_softmax(t["logits"][real] / 2, -1), log_target=True,
                                    reduction="batchmean") * 4
    cos = (1 - torch.nn.functional.cosine_similarity(s["bert"][real], t["bert"][real], dim=-1)).mean()
    torch.testing.assert_close(out.parts["cross_entropy"], ce)
    torch.testing.assert_close(out.parts["kl"], kl)
    torch.testing.assert_close(out.parts["cosine[bert]"], cos)


class Crash(RuntimeError):
    pass


def test_masks_change_across_epochs_and_repeat_after_a_resume(tmp_path):
    data = Examples(24)
    spec = TrainSpec(epochs=3, batch_size=4, learning_rate=1e-2, checkpoint_every=2, mixed_precision="no")

    def run(folder, crash_after=None):
        seen: list[tuple[int, torch.Tensor]] = []
        transform = DynamicMasking(synthetic_masker(), spec.seed, math.ceil(len(data) / spec.batch_size))

        def recording(batch, generator):
            out = transform(batch, generator)
            seen.extend(zip(out.indices.tolist(), out.student_inputs["input_ids"], strict=True))
            if crash_after is not None and len(seen) > crash_after:
                raise Crash
            return out

        engine = Engine(Accelerator(cpu=True), spec, folder, progress=False,
                        prepare_batch=_batch_preparation(recording, None, spec.seed))
        torch.manual_seed(0)
        result = engine.fit(tiny_bert(0).float(), Objective([Term("cross_entropy")]),
                            make_loader(data, spec.batch_size, collate, seed=spec.seed))
        return result, seen

    reference, seen = run(tmp_path / "a")
    per_epoch = [dict((i, x) for i, x in seen[e * 24:(e + 1) * 24]) for e in range(3)]
    assert all(len(epoch) == 24 for epoch in per_epoch)  # every example once an epoch
    changed = sum(not torch.equal(per_epoch[0][i], per_epoch[1][i]) for i in range(24))
    assert changed >= 20  # a fresh mask (a short sequence may draw the same nothing)
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_after=41)  # in epoch 2, between checkpoints
    resumed, seen_after = run(tmp_path / "b")
    assert 24 < len(seen_after) < 48  # from the last checkpoint in epoch 2, then epoch 3
    for (i, x), (j, y) in zip(seen_after, seen[-len(seen_after):], strict=True):
        assert i == j and torch.equal(x, y)  # the same examples with the same masks
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


# ----- models, metrics, the recipe ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
def test_the_hidden_signal_is_the_last_hidden_state(kind):
    import transformers

    torch.manual_seed(0)
    config = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
              "distilbert": transformers.DistilBertConfig}[kind]
    sizes = ({"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32} if kind == "distilbert" else
             {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32})
    model = transformers.AutoModelForMaskedLM.from_config(config(vocab_size=100, **sizes)).eval()
    ids = torch.randint(5, 100, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    signal = hidden_signal(model)
    assert signal == kind
    captured = forward_signals(model, inputs, {"logits", signal})
    last = model(**inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(captured[signal], last)


def test_the_student_takes_every_other_teacher_layer_and_init_student_does_the_same(tmp_path):
    task = MaskedLM(tiny_recipe(tmp_path), progress=False)
    teacher = task.build_model(task.recipe.teacher)
    with pytest.raises(RecipeError, match="trained in this run"):
        task.build_model(task.recipe.student)
    task.teacher = teacher  # as a run does once its teacher is ready
    student = task.build_model(task.recipe.student)
    assert student.config.num_hidden_layers == 2
    for k, layer in enumerate(student.bert.encoder.layer):
        for (name, p), q in zip(layer.named_parameters(), teacher.bert.encoder.layer[2 * k].parameters(), strict=True):
            assert torch.equal(p, q), name
    assert torch.equal(student.cls.predictions.transform.dense.weight, teacher.cls.predictions.transform.dense.weight)
    assert all(p.requires_grad for p in student.parameters())
    # the same cut by `potstill init-student` from a saved masked-LM teacher keeps its head
    teacher.save_pretrained(tmp_path / "teacher")
    task.tokenizer.save_pretrained(tmp_path / "teacher")
    init_student(tmp_path / "teacher", tmp_path / "student", [1, 3])
    loaded = BertForMaskedLM.from_pretrained(tmp_path / "student")
    assert loaded.config.num_hidden_layers == 2
    assert torch.equal(loaded.bert.encoder.layer[1].output.dense.weight,
                       teacher.bert.encoder.layer[3].output.dense.weight)
    assert torch.equal(loaded.cls.predictions.bias, teacher.cls.predictions.bias)
    # random init: the same shape, fresh weights
    fresh = task.build_model(task.recipe.student.model_copy(update={"init": "random"}))
    assert fresh.config.num_hidden_layers == 2
    assert not torch.equal(fresh.bert.encoder.layer[0].output.dense.weight,
                           teacher.bert.encoder.layer[0].output.dense.weight)


def test_a_pretrained_encoder_gets_a_fresh_head_and_only_the_head_trains(tmp_path):
    from transformers import BertModel

    task = MaskedLM(tiny_recipe(tmp_path), progress=False)
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=len(task.tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    encoder.save_pretrained(tmp_path / "encoder")
    task.tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.raises(RecipeError, match="without a masked-LM head"):
        task.build_model(task.recipe.teacher.model_copy(update={"model_name_or_path": str(tmp_path / "encoder")}))
    recipe = tiny_recipe(tmp_path, f"teacher.encoder={tmp_path / 'encoder'}", "teacher.freeze_encoder=true")
    task = MaskedLM(recipe, progress=False)
    teacher = task.build_model(recipe.teacher)
    assert torch.equal(teacher.bert.encoder.layer[1].output.dense.weight, encoder.encoder.layer[1].output.dense.weight)
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("cls.") for n in trainable)
    assert task.objective().terms[2].teacher == "bert"


def test_pseudo_perplexity_masks_each_token_in_turn(tmp_path):
    task = MaskedLM(tiny_recipe(tmp_path), progress=False)
    model = task.build_model(task.recipe.teacher).eval()
    nats, count = 0.0, 0
    with torch.no_grad():
        for example in task.eval_set[:2]:  # one forward per token, by hand
            ids = example["input_ids"]
            for pos in range(1, len(ids) - 1):  # [CLS] and [SEP] are not scored
                copy = ids.clone()
                copy[pos] = task.tokenizer.mask_token_id
                logits = model(input_ids=copy[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
                nats -= logits[0, pos].log_softmax(-1)[ids[pos]].item()
                count += 1
    assert task.pseudo_perplexity(model, 2, batch_size=7) == pytest.approx(math.exp(nats / count), rel=1e-5)


def test_the_objective_has_distilberts_three_named_terms(tmp_path):
    task = MaskedLM(tiny_recipe(tmp_path), progress=False)
    kl, ce, cos = task.objective().terms
    assert (kl.loss, kl.weight, dict(kl.params), kl.ignore_labels) == ("kl", 5.0, {"temperature": 2.0}, True)
    assert (ce.loss, ce.weight) == ("cross_entropy", 2.0)
    assert (cos.loss, cos.weight, cos.student, cos.teacher, cos.ignore_labels) == ("cosine", 1.0, "bert", "bert", True)
    task = MaskedLM(tiny_recipe(tmp_path, "distillation.weights.cosine=0", "distillation.kl_positions=masked"),
                    progress=False)
    assert [t.loss for t in task.objective().terms] == ["kl", "cross_entropy"]
    assert not task.objective().terms[0].ignore_labels


def test_recipe_errors_name_the_field(tmp_path):
    with pytest.raises(RecipeError, match="needs the live teacher"):
        tiny_recipe(tmp_path, "teacher_cache={}")
    with pytest.raises(RecipeError, match=r"data.masking.*at most 1"):
        tiny_recipe(tmp_path, "data.masking.random=0.3")
    with pytest.raises(RecipeError, match="does not compare two masked-LM distributions"):
        tiny_recipe(tmp_path, "distillation.loss=cosine")
    with pytest.raises(RecipeError, match="freeze_encoder needs encoder"):
        tiny_recipe(tmp_path, "teacher.freeze_encoder=true")
    with pytest.raises(RecipeError, match="fused loss would skip"):
        tiny_recipe(tmp_path, "train.fused_loss=true")
    assert tiny_recipe(tmp_path).train.fused_loss is False  # "auto" would fuse a 30k+ vocabulary wrongly


def test_distilbert_recipe_runs_by_name_and_the_students_learn(tmp_path):
    result = distill(tiny_recipe(tmp_path), progress=False)
    models = result.metrics["models"]
    assert set(models) == {"teacher", "scratch", "student"}
    vocab = result.metrics["vocab_size"]
    assert models["teacher"]["mlm_loss"] < math.log(vocab) - 0.2  # better than uniform on held-out text
    for name, m in models.items():
        assert 0 < m["masked_token_accuracy"] < 1 and 1 < m["pseudo_perplexity"] < vocab, name
    assert models["student"]["parameters"] < models["teacher"]["parameters"]
    assert models["teacher"]["accuracy_vs_teacher"] == 1.0
    # both students start as the teacher's every other layer; the one distilled with the triple loss
    # stays far closer to the teacher's distributions than the one trained on masked-LM CE only
    assert models["student"]["kl_to_teacher"] < 0.5 * models["scratch"]["kl_to_teacher"]
    assert models["student"]["agreement"] > models["scratch"]["agreement"]
    # the saved student reloads as a plain masked LM with its tokenizer
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    student = AutoModelForMaskedLM.from_pretrained(result.run_dir / "student")
    assert student.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(result.run_dir / "student").mask_token == "[MASK]"
