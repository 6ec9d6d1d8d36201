"""Forward speed of a sentence-embedding run's teacher and student (median of repeats, one process).

    python benchmarks/encoder_speed.py runs/bench-minilm/from-teacher --out benchmarks/results/encoder_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from potstill.recipes import load_recipe
from potstill.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/encoder_speed.json")
    args = parser.parse_args()
    run = Path(args.run_dir)
    recipe = load_recipe(run / "recipe.yaml")
    task = TASKS["sentence-embedding"](recipe, progress=False)
    models = {"teacher": task.build_model(recipe.teacher), "student": task.load_model(run / "student")}
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        for name, model in models.items():
            speeds[name].append(task.embed(model, task.eval_set)[1])
    result = {name: {"sentences_per_second": statistics.median(v), "all": v} for name, v in speeds.items()}
    result["speedup"] = result["student"]["sentences_per_second"] / result["teacher"]["sentences_per_second"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
