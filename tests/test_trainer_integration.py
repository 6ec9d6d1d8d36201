"""DistillationTrainer: the Objective inside a Hugging Face Trainer, right under gradient accumulation."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from potstill.integrations import DistillationTrainer
from potstill.losses import kl_divergence


def tiny_lm(seed: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (8, 12), generator=g)
    labels = ids.clone()
    # very different numbers of labelled tokens per example: per-micro-batch means would weight them unequally
    for row, keep in enumerate([12, 2, 9, 3, 12, 1, 6, 11]):
        labels[row, keep:] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                              "teacher_input_ids": ids.tolist(), "unused": list(range(8))})


class PerMicroBatchMean(DistillationTrainer):
    """The common mistake, as a control: average each micro-batch, then divide by the steps."""

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, None)


def train(tmp_path, batch_size: int, accumulation: int, trainer_class=DistillationTrainer) -> dict[str, torch.Tensor]:
    args = TrainingArguments(output_dir=str(tmp_path / f"out{batch_size}"), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=3, learning_rate=0.5,
                             optim="sgd", logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                             lr_scheduler_type="constant", dataloader_drop_last=True, disable_tqdm=True)
    trainer = trainer_class(model=tiny_lm(1, 1), teacher_model=tiny_lm(2, 2), args=args,
                            train_dataset=dataset(), loss="kl", alpha=0.7, temperature=2.0)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = train(tmp_path, batch_size=4, accumulation=1)
    split = train(tmp_path, batch_size=1, accumulation=4)
    assert max_difference(split, big) < 1e-5
    # the control: per-micro-batch means weight a 1-token example like a 12-token one
    naive = train(tmp_path, batch_size=1, accumulation=4, trainer_class=PerMicroBatchMean)
    assert max_difference(naive, big) > 100 * 1e-5


def test_loss_is_the_objective_over_shifted_labels(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True)
    student, teacher = tiny_lm(1, 1), tiny_lm(2, 2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(),
                                  loss="kl", alpha=1.0, temperature=2.0)
    data = dataset()[:2]
    inputs = {k: torch.tensor(data[k]) for k in ("input_ids", "labels")}
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        s, t = student(input_ids=inputs["input_ids"]).logits, teacher(input_ids=inputs["input_ids"]).logits
    expected = kl_divergence(s[:, :-1], t[:, :-1], temperature=2.0, labels=inputs["labels"][:, 1:])
    torch.testing.assert_close(loss, expected)


def test_labels_and_teacher_columns_survive_remove_unused_columns(tmp_path):
    seen: list[set[str]] = []

    class Recording(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(set(inputs))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=True)
    Recording(model=tiny_lm(1, 1), teacher_model=tiny_lm(2, 2), args=args, train_dataset=dataset()).train()
    assert seen and {"input_ids", "labels", "teacher_input_ids"} <= seen[0] and "unused" not in seen[0]
