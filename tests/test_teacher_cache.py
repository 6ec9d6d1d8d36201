"""The teacher cache: written once, resumable, refused when stale, and training from it works."""

from __future__ import annotations

import json

import pytest
import torch

from potstill.distill import Run, cache_teacher, distill
from potstill.losses import get_loss
from potstill.recipes import load_recipe
from potstill.teachers import CachedTeacher, CacheMismatch, write_cache

TINY_LM = [
    "data.max_train_examples=48", "data.max_eval_examples=8", "data.block_size=32", "data.tokenizer.vocab_size=300",
    "teacher.hidden_size=32", "teacher.num_layers=1", "teacher.intermediate_size=64", "teacher.train.epochs=1",
    "teacher.train.batch_size=8", "student.hidden_size=16", "student.num_layers=1", "student.intermediate_size=32",
    "train.epochs=1", "train.batch_size=8", "baseline=false",
]


def test_full_vocabulary_cache_gives_the_live_loss(tmp_path):
    recipe = load_recipe("tiny-lm", [*TINY_LM, "distillation.temperature=2.0"])
    run = Run.open(recipe, tmp_path / "run", overwrite=False, progress=False)
    teacher = run.teacher()
    vocab = len(run.task.tokenizer)
    info = write_cache(tmp_path / "cache", teacher, run.task.transfer_set, run.task.collate, top_k_size=vocab,
                       temperature=2.0, dtype="float32", shard_size=20, progress=False)
    assert len(info.manifest["shards"]) == 3  # 48 examples in shards of 20
    cached = CachedTeacher(tmp_path / "cache")
    indices = torch.tensor([3, 25, 47, 0])
    batch = run.task.collate([run.task.transfer_set[i] for i in indices])
    batch.indices = indices
    with torch.no_grad():
        live = teacher(**batch.teacher_inputs).logits
    student_logits = torch.randn_like(live)
    for loss in ("kl", "reverse_kl", "jsd"):
        dense = get_loss(loss).fn(student_logits, live, temperature=2.0, labels=batch.labels)
        from potstill.losses import sparse_loss

        sparse = sparse_loss(student_logits, cached.signals(batch)["logits"], loss=loss, temperature=2.0,
                             labels=batch.labels)
        # float32 noise only: the cache ran the teacher on other batches (other padding, other kernels)
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


def test_cache_resumes_rewrites_torn_shards_and_refuses_stale_data(tmp_path, capsys):
    recipe = load_recipe("tiny-lm", [*TINY_LM, "teacher_cache={top_k: 8, shard_size: 16}"])
    run_dir = tmp_path / "run"
    info = cache_teacher(recipe, run_dir, progress=False)
    folder = info.folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["identity"]["top_k"] == 8
    # k = 8 in bfloat16: 8 ids x 4 bytes + 8 log-probs x 2 + rest x 2 = 50 bytes per position
    assert info.bytes_per_position == pytest.approx(50)
    first = folder / "shard-00000.safetensors"
    untouched = (folder / "shard-00001.safetensors").stat().st_mtime_ns
    first.write_bytes(first.read_bytes()[:100])  # a torn shard
    cache_teacher(recipe, run_dir, progress=False)
    assert json.loads((folder / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert (folder / "shard-00001.safetensors").stat().st_mtime_ns == untouched  # finished shards kept

    other = load_recipe("tiny-lm", [*TINY_LM, "teacher_cache={top_k: 8, shard_size: 16}", "data.block_size=16",
                                    "data.max_train_examples=96"])
    run = Run.open(other, tmp_path / "other", overwrite=False, progress=False)
    with pytest.raises(CacheMismatch, match="different data"):
        write_cache(folder, run.teacher(), run.task.transfer_set, run.task.collate, top_k_size=8, temperature=1.0,
                    dtype="bfloat16", shard_size=16, progress=False, identity={"teacher_name": "trained"})


def test_training_from_a_full_cache_follows_the_live_teacher(tmp_path):
    """Same seeds, same data order: a student trained from a k = V float32 cache ends where the live one does."""
    base = [*TINY_LM, "train.epochs=2", "train.learning_rate=1e-2", "distillation.temperature=2.0",
            "distillation.alpha=0.7"]
    live = distill(load_recipe("tiny-lm", base), tmp_path / "live", progress=False)
    vocab = live.metrics["vocab_size"]
    cached = distill(load_recipe("tiny-lm", [*base, f"teacher_cache={{top_k: {vocab}, dtype: float32}}"]),
                     tmp_path / "cached", progress=False)
    assert (tmp_path / "cached" / "teacher-cache" / "manifest.json").is_file()
    a, b = live.metrics["models"]["student"], cached.metrics["models"]["student"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert b["kl_to_teacher"] == pytest.approx(a["kl_to_teacher"], rel=1e-3)


class Rank:
    """One process of several, as the cache writer sees it; no real barrier (the test runs the ranks in turn)."""

    def __init__(self, index: int, count: int):
        self.process_index, self.num_processes, self.is_main_process = index, count, index == 0

    def wait_for_everyone(self) -> None:
        pass


def test_processes_split_the_shards_and_a_killed_split_run_is_finished_by_one_process(tmp_path):
    from potstill.models import MLP
    from potstill.tasks import ImageClassification
    from tests.test_engine import data

    torch.manual_seed(0)
    teacher, dataset = MLP(12, 3, [16]), data(90)
    write = lambda folder, processes=None: write_cache(  # noqa: E731
        folder, teacher, dataset, ImageClassification.collate, top_k_size=2, temperature=2.0, dtype="float32",
        shard_size=20, progress=False, processes=processes)
    one = tmp_path / "one"
    write(one)
    split = tmp_path / "split"
    write(split, Rank(0, 2))  # the main process: shards 0, 2, 4, folded into the manifest
    assert sorted(p.name for p in split.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in (0, 2, 4)]
    write(split, Rank(1, 2))  # the other process: shards 1, 3, recorded, then killed before the manifest
    assert sorted(p.name for p in split.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(5)]
    assert len(json.loads((split / "manifest.json").read_text())["shards"]) == 3
    with pytest.raises(CacheMismatch, match="incomplete"):
        CachedTeacher(split)
    written = {p.name: p.stat().st_mtime_ns for p in split.glob("shard-*")}
    write(split)  # one process finishes it: the recorded shards are kept, nothing is recomputed
    assert {p.name: p.stat().st_mtime_ns for p in split.glob("shard-*")} == written
    assert sorted(p.name for p in split.iterdir()) == sorted(p.name for p in one.iterdir())  # no .progress left
    for path in one.iterdir():
        assert (split / path.name).read_bytes() == path.read_bytes(), path.name
    assert CachedTeacher(split).lookup(torch.tensor([0, 89])).ids.shape == (2, 2)
