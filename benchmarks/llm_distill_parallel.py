"""Run the LLM table's rows as parallel processes on one GPU, in priority order, until a deadline.

A row of ``llm_distill.py`` is launch-bound on a large GPU (small models, batch 8), so several
at once use it far better than one after another. Rows run in this order: every method with
seed 0, then seed 1, then the similar-size cross-tokenizer student (seed 0), then seed 2. Each
row writes its own JSON as soon as it finishes (``--out-dir``); a row still running at the
deadline is killed, and no row is started that cannot finish (``--min-row-seconds``). Merge the
rows afterwards with ``llm_distill.py --merge OUT_DIR/llm_*.json``.

    python benchmarks/llm_distill_parallel.py --parallel 12 --seconds 3000 --out-dir runs/llm-gpu \\
        -- --examples 5600 --eval-examples 256 --generation-batch 128
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from llm_distill import CROSS, SAME, slug

FIRST_SEED_ONLY = {"JSD(0.5) + CE (α=0.5)"}
MAIN_CROSS = [m for m in CROSS if not m.startswith("0.1")]


def rows() -> list[tuple[str, int, str, str]]:
    """(table, seed, method, cross-student size) in the order they should run."""
    order = []
    for seed in (0, 1, 2):
        order += [("same", seed, m, "small") for m in SAME if seed == 0 or m not in FIRST_SEED_ONLY]
        order += [("cross", seed, m, "small") for m in MAIN_CROSS]
        if seed == 1:
            order += [("cross", 0, m, "similar") for m in MAIN_CROSS]
    return order


def tag(table: str, seed: int, method: str, size: str) -> str:
    return f"{table}-{size}-{seed}-{slug(method)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3600, help="deadline, from now")
    parser.add_argument("--min-row-seconds", type=float, default=150, help="start no row with less time left")
    parser.add_argument("--out-dir", default="runs/llm-parallel")
    parser.add_argument("extra", nargs="*", help="after --: arguments for every llm_distill.py row")
    args = parser.parse_args()
    out = Path(args.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("llm_distill.py")
    start = time.time()
    deadline = start + args.seconds
    todo, running = rows(), []
    while todo or running:
        while todo and len(running) < args.parallel and time.time() < deadline - args.min_row_seconds:
            table, seed, method, size = todo.pop(0)
            name = tag(table, seed, method, size)
            cmd = [sys.executable, str(script), "--only", table, "--seeds", str(seed), "--methods", method,
                   "--cross-student", size, "--work", str(out / "work" / size), "--out", str(out / f"llm_{name}.json"),
                   *args.extra]
            with open(out / "logs" / f"{name}.log", "w") as log:
                running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time()))
            print(f"{time.time() - start:6.0f}s start {name}", flush=True)
        time.sleep(2)
        for item in list(running):
            name, proc, began = item
            if proc.poll() is not None or time.time() > deadline:
                if proc.poll() is None:
                    proc.kill()
                running.remove(item)
                status = "killed at the deadline" if proc.returncode in (None, -9) else f"rc={proc.returncode}"
                print(f"{time.time() - start:6.0f}s {status} {name} ({time.time() - began:.0f}s)", flush=True)
        if not running and time.time() >= deadline - args.min_row_seconds:
            break
    print(f"{len(todo)} rows not started")


if __name__ == "__main__":
    main()
