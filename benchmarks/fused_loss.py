"""Loss forward+backward at large vocabularies: peak memory and time, one process per method.

Methods (all compute JSD(β=0.5) between a student head over hidden states and a teacher head):
  fused  potstill.losses.fused.fused_linear_loss (chunks of tokens; never holds N × V logits)
  naive  materialise student and teacher logits, then potstill.losses.jsd
  trl    materialise logits, then TRL's GKDTrainer.generalized_jsd_loss (if trl is installed)

Peak memory is the child process's peak resident set minus its resident set just before the
loss (inputs already allocated). Time is the median of --repeats runs after one warm-up.
The matmul FLOPs of forward+backward are 8·N·H·V (student logits, grad of hidden, grad of
weight, plus the teacher's logits), so the reported rate is 8·N·H·V / time.

    python benchmarks/fused_loss.py --out benchmarks/results/fused_loss.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(method: str, n: int, h: int, v: int, repeats: int, chunk: int) -> dict:
    # imports first, so the baseline resident set includes the libraries and only the loss's
    # own allocations count
    from potstill.losses import jsd
    from potstill.losses.fused import fused_linear_loss

    if method == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    torch.manual_seed(0)
    hidden = torch.randn(n, h).requires_grad_()
    weight = (torch.randn(v, h) * 0.02).requires_grad_()
    t_hidden = torch.randn(n, h)
    t_weight = torch.randn(v, h) * 0.02

    def run() -> None:
        if method == "fused":
            loss = fused_linear_loss(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                     loss="jsd", beta=0.5, chunk_size=chunk)
        else:
            s_logits = hidden @ weight.T
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.T
            if method == "naive":
                loss = jsd(s_logits, t_logits, beta=0.5)
            else:
                loss = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, beta=0.5)
        loss.backward()
        hidden.grad = weight.grad = None

    before = rss_mb()
    run()  # warm-up (also reaches the peak)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = statistics.median(times)
    return {"method": method, "n": n, "h": h, "v": v, "seconds": seconds, "peak_mb": peak - before,
            "gflops": 8 * n * h * v / seconds / 1e9, "threads": torch.get_num_threads()}


def matmul_rate(h: int = 1024, size: int = 4096) -> float:
    a, b = torch.randn(size, h), torch.randn(h, size)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * size * h * size / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "N", "H", "V"))
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--vs", type=int, nargs="+", default=[32_000, 128_000])
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", default=["fused", "naive", "trl"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--memory-limit-gb", type=float, default=20.0, help="address-space limit per method")
    parser.add_argument("--out", default="benchmarks/results/fused_loss.json")
    args = parser.parse_args()
    if args.child:
        # a failed allocation is an honest "out of memory" row, not the kernel's OOM killer
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        method, n, h, v = args.child
        print(json.dumps(child(method, int(n), int(h), int(v), args.repeats, args.chunk)))
        return

    rate = matmul_rate(args.h)
    rows = []
    for n in args.ns:
        for v in args.vs:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", method, str(n), str(args.h), str(v),
                       "--repeats", str(args.repeats), "--chunk", str(args.chunk),
                       "--memory-limit-gb", str(args.memory_limit_gb)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append({"method": method, "n": n, "h": args.h, "v": v, "error": tail})
                else:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"matmul_gflops": rate, "chunk": args.chunk, "rows": rows}, indent=2) + "\n")

    print(f"\nfloat32 matmul rate of this machine: {rate:.0f} GFLOP/s (chunk {args.chunk})\n")
    print("| N | V | method | time (s) | peak memory (MB) | time / naive | memory / naive | matmul rate |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        naive = next((r for r in rows if r["method"] == "naive" and r["n"] == row["n"] and r["v"] == row["v"]
                      and "error" not in r), None)
        if "error" in row:
            print(f"| {row['n']} | {row['v']:,} | {row['method']} | failed: {row['error']} | | | | |")
            continue
        ratio_t = f"{row['seconds'] / naive['seconds']:.2f}×" if naive else "—"
        ratio_m = f"{row['peak_mb'] / naive['peak_mb']:.2f}×" if naive else "—"
        print(f"| {row['n']} | {row['v']:,} | {row['method']} | {row['seconds']:.2f} | {row['peak_mb']:.0f} | "
              f"{ratio_t} | {ratio_m} | {row['gflops'] / rate:.0%} |")


if __name__ == "__main__":
    main()
