"""CNN distillation on MNIST: a ResNet-style teacher → a small CNN, with logit KD and with logit KD
plus feature-map terms.

Both models are transformers ``ResNetForImageClassification`` built from configs (any
``AutoModelForImageClassification`` works the same way): the teacher has stages of 32, 64 and 128
channels (two basic blocks each), the student 8, 16 and 32 (one block each). For each seed:

- teacher: trained on hard labels, on images jittered by up to 2 pixels;
- scratch: the student trained on hard labels alone;
- logit KD: the student distilled with Hinton's KL at T + CE;
- logit KD + feature maps: the same, plus MSE between the outputs of the student's stages 2 and 3
  and the teacher's (8→32... channels: a learned 1×1 convolution maps the student's channels to
  the teacher's, ``losses.ChannelProjection``).

Data: the 10,000-image MNIST set that ships with potstill, split 8,000 train / 2,000 eval by the
seed (as ``hinton_mnist.py``). Errors are counted on the 2,000 eval images.

    OMP_NUM_THREADS=1 python benchmarks/image_cnn.py --threads 1 --out benchmarks/results/image_cnn.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from potstill.distill import distill
from potstill.io import write_json
from potstill.recipes import parse_recipe

TEACHER = {"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2],
           "layer_type": "basic"}
STUDENT = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 32], "depths": [1, 1, 1],
           "layer_type": "basic"}
#: the student's stage outputs matched to the teacher's (same strides: 7×7 … 2×2 maps on MNIST)
FEATURE_MAPS = ["resnet.encoder.stages.1", "resnet.encoder.stages.2"]


def recipe(seed: int, args: argparse.Namespace, run_dir: Path, *, features: bool, teacher_folder: Path | None) -> Any:
    teacher: dict[str, Any] = {"architecture": "transformers", "config": TEACHER, "jitter": 2,
                               "train": {"epochs": args.teacher_epochs, "batch_size": 128,
                                         "learning_rate": args.teacher_lr, "seed": seed}}
    if teacher_folder is not None:  # the seed's trained teacher, used as it is
        teacher = {"architecture": "transformers", "model_name_or_path": str(teacher_folder)}
    terms = [{"student": path, "teacher": path, "loss": "mse", "weight": args.feature_weight} for path in FEATURE_MAPS]
    return parse_recipe({
        "task": "image-classification",
        "data": {"name": "mnist", "split_seed": seed},
        "teacher": teacher,
        "student": {"architecture": "transformers", "config": STUDENT},
        "distillation": {"loss": "kl", "temperature": args.temperature, "alpha": args.alpha,
                         "features": terms if features else []},
        "train": {"epochs": args.epochs, "batch_size": 64, "learning_rate": args.lr, "seed": seed},
        "baseline": teacher_folder is None,
        "output_dir": str(run_dir),
    })


def finished_or_run(recipe: Any) -> dict[str, Any]:
    """The metrics of a finished run (read back, not rerun), or of the run made now."""
    finished = Path(recipe.output_dir) / "metrics.json"
    return json.loads(finished.read_text()) if finished.is_file() else distill(recipe, progress=False).metrics


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-image-cnn"))
    parser.add_argument("--features-run", default="kd-features",
                        help="the feature-map runs are RUNS/seed-N/FEATURES_RUN (another name: other settings, "
                             "the same teachers and first runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/image_cnn.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = ("teacher", "scratch", "logit KD", "logit KD + feature maps")
    per_seed: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        started = time.perf_counter()
        base = args.runs / f"seed-{seed}"
        first = finished_or_run(recipe(seed, args, base / "kd", features=False, teacher_folder=None))
        second = finished_or_run(recipe(seed, args, base / args.features_run, features=True,
                                        teacher_folder=base / "kd" / "teacher"))
        models = {"teacher": first["models"]["teacher"], "scratch": first["models"]["scratch"],
                  "logit KD": first["models"]["student"], "logit KD + feature maps": second["models"]["student"]}
        assert second["models"]["teacher"]["errors"] == models["teacher"]["errors"]  # the same teacher
        per_seed[str(seed)] = {"models": models, "seconds": time.perf_counter() - started}
        print(json.dumps({"seed": seed, **{name: m["errors"] for name, m in models.items()}}), flush=True)

    eval_images = 2000
    table = {name: {"errors": summary([r["models"][name]["errors"] for r in per_seed.values()]),
                    "parameters": next(iter(per_seed.values()))["models"][name]["parameters"]} for name in rows}
    for name in rows[1:]:
        table[name]["agreement"] = summary([r["models"][name]["agreement"] for r in per_seed.values()])
    results = {"seeds": per_seed, "summary": table, "eval_images": eval_images,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "teacher_config": TEACHER, "student_config": STUDENT, "feature_maps": FEATURE_MAPS}
    write_json(args.out, results)
    print(f"{'model':26} {'parameters':>10}  errors / {eval_images} (mean ± std over {len(per_seed)} seeds)")
    for name, row in table.items():
        e = row["errors"]
        print(f"{name:26} {row['parameters']:>10,}  {e['mean']:7.1f} ± {e['std']:5.1f}   "
              f"(min {e['min']:.0f}, max {e['max']:.0f})")


if __name__ == "__main__":
    main()
