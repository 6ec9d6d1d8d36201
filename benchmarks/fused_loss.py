"""Loss forward+backward at large vocabularies: working memory, time and FLOP rate, one process per method.

Each method computes a distillation loss between a student head over N hidden states and a
teacher head (teacher logits computed too), forward and backward (gradients of the student's
hidden states and head weight):

  fused         potstill.losses.fused.fused_linear_loss, default arguments (chunk size chosen by it)
  fused:C       the same with chunk_size=C
  fused-autograd  the same, autograd on each chunk instead of the closed-form gradients
  naive         materialise student and teacher logits, then the registered potstill loss
  liger         Liger-Kernel's chunked LigerFusedLinearJSDLoss (torch-native, run on CPU; β = 0 is
                forward KL, β = 0.5 the symmetric JSD), its defaults (chunk 1,024, torch.compile)
  trl           materialise logits, then TRL's GKDTrainer.generalized_jsd_loss
  cached-naive / cached-fused  a top-k SparseTarget teacher (forward KL): the materialised
                sparse_loss against fused_linear_loss with the same target

Working memory is the child process's peak resident set minus its resident set just before the
loss (inputs and libraries already loaded). Time is the best of --repeats runs; with one thread it
is the process's CPU time (the machine may be shared with other jobs: time-slicing does not count,
and the sgemm rate is measured the same way), with more threads or a GPU the wall time. The matmul FLOPs are 8·N·H·V
(student logits, teacher logits, grad of hidden, grad of weight); the rate is reported as a
fraction of this machine's sgemm rate on the same shapes (plain torch.mm, same threads), measured
in the same process right after the loss (on a shared machine, the rate it had at that time).

    python benchmarks/fused_loss.py --out benchmarks/results/fused_loss.json           # the table
    python benchmarks/fused_loss.py --sweep --out benchmarks/results/fused_chunks.json  # chunk sizes
    python benchmarks/fused_loss.py --device cuda --dtype bfloat16 ...                  # a GPU row
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

LOSSES = {"kl": ({}, 0.0), "jsd": ({"beta": 0.5}, 0.5)}  # potstill params, Liger's β for the same loss


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set to the current one
        f.write("5")


def child(method: str, loss: str, n: int, h: int, v: int, repeats: int, device: str, dtype: str, k: int,
          warmup: bool = True) -> dict:
    # imports first, so the baseline resident set includes the libraries and only the loss's own
    # allocations count
    from potstill.losses import get_loss, sparse_loss, top_k
    from potstill.losses.fused import HeadInputs, default_chunk_size, fused_linear_loss

    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    if method == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    params, liger_beta = LOSSES[loss]
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dt).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dt) * 0.02).requires_grad_()
    t_hidden = torch.randn(n, h, device=device, dtype=dt)
    t_weight = torch.randn(v, h, device=device, dtype=dt) * 0.02
    target = None
    if method.startswith("cached"):
        with torch.no_grad():
            target = top_k(t_hidden @ t_weight.T, k)  # the cache's content; not part of the loss's memory
    labels = torch.zeros(n, dtype=torch.long, device=device)
    liger = (LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=liger_beta)
             if method == "liger" else None)

    def run() -> None:
        if method.startswith("fused"):
            chunk = int(method.split(":")[1]) if ":" in method else None
            value = fused_linear_loss(HeadInputs(hidden, weight), HeadInputs(t_hidden, t_weight), loss=loss,
                                      chunk_size=chunk, closed_form=not method.startswith("fused-autograd"),
                                      **params).loss
        elif method == "cached-fused":
            value = fused_linear_loss(HeadInputs(hidden, weight), target, loss=loss, **params).loss
        elif method == "cached-naive":
            value = sparse_loss(hidden @ weight.T, target, loss=loss, **params)
        elif method == "liger":
            value = liger(hidden, weight, t_hidden, t_weight, labels)
        else:
            s_logits = hidden @ weight.T
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.T
            if method == "naive":
                value = get_loss(loss).fn(s_logits, t_logits, **params)
            else:
                value = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, beta=liger_beta)
        value.backward()
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_mb()
        reset_peak_rss()
    if warmup or method == "liger":
        run()  # Liger's torch.compile; the others keep nothing between calls (each call pays the same)
    times, wall = [], []
    for _ in range(repeats):
        start, start_wall = clock(), time.perf_counter()
        run()
        times.append(clock() - start)
        wall.append(time.perf_counter() - start_wall)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = peak_rss_mb() - before
    seconds = min(times)
    flops = 6 if method.startswith("cached") else 8  # a cached teacher's logits are not computed
    chunk = (int(method.split(":")[1]) if ":" in method else
             default_chunk_size(n, v, blocks=2 if method == "cached-fused" else 4, dtype=dt, device=device)
             if method in ("fused", "cached-fused") else None)
    # the sgemm rate right after, in the same process: the machine may be shared, and this is the
    # rate it gave a plain matmul at the time
    sgemm = matmul_rate(h, v, 1024, device, dtype) if device == "cpu" or dtype == "float32" else None
    return {"method": method, "loss": loss, "n": n, "h": h, "v": v, "seconds": seconds, "all_seconds": times,
            "sgemm_gflops": sgemm,
            "wall_seconds": min(wall), "clock": "cpu" if torch.get_num_threads() == 1 and device == "cpu" else "wall",
            "peak_mb": peak, "gflops": flops * n * h * v / seconds / 1e9,
            "threads": torch.get_num_threads(), "chunk": chunk, "device": device, "dtype": dtype}


def matmul_rate(h: int, v: int, rows: int, device: str, dtype: str) -> float:
    """GFLOP/s of the loss's three matmul shapes (logits, grad of hidden, grad of weight), plain torch.mm
    (the vocabulary capped at 65,536: the rate no longer depends on it, and the measurement stays short)."""
    dt = getattr(torch, dtype)
    v = min(v, 65_536)
    a, w = torch.randn(rows, h, device=device, dtype=dt), torch.randn(v, h, device=device, dtype=dt)
    g, gw = torch.randn(rows, v, device=device, dtype=dt), torch.zeros(v, h, device=device, dtype=dt)
    out = torch.empty(rows, v, device=device, dtype=dt)

    def once() -> None:
        torch.mm(a, w.t(), out=out)
        torch.mm(g, w)
        gw.addmm_(g.t(), a)
        if device == "cuda":
            torch.cuda.synchronize()

    once()
    best = float("inf")
    for _ in range(2):
        start = clock()
        once()
        best = min(best, clock() - start)
    return 3 * 2 * rows * h * v / best / 1e9


def clock() -> float:
    """Process CPU time for one thread (the machine is shared: time-slicing with other jobs does not
    count), wall time otherwise (several threads, or a GPU)."""
    return time.process_time() if torch.get_num_threads() == 1 and not torch.cuda.is_initialized() \
        else time.perf_counter()


def run_child(args: argparse.Namespace, method: str, loss: str, n: int, v: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, loss, str(n), str(v), "--h", str(args.h),
           "--repeats", str(args.repeats), "--memory-limit-gb", str(args.memory_limit_gb),
           "--device", args.device, "--dtype", args.dtype, "--k", str(args.k), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "loss": loss, "n": n, "h": args.h, "v": v, "threads": args.threads,
                "error": tail[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "LOSS", "N", "V"))
    parser.add_argument("--ns", type=int, nargs="+", default=[4096])
    parser.add_argument("--vs", type=int, nargs="+", default=[128_000])
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--losses", nargs="+", default=["kl", "jsd"])
    parser.add_argument("--methods", nargs="+", default=["fused", "liger", "naive"])
    parser.add_argument("--sweep", action="store_true", help="time fused at several chunk sizes (--chunks)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved passes over all methods")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="1: one untimed run first (0 for the sweep)")
    parser.add_argument("--k", type=int, default=64, help="top-k of the cached teacher (cached-* methods)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--memory-limit-gb", type=float, default=14.0, help="address-space limit per method")
    parser.add_argument("--out", default="benchmarks/results/fused_loss.json")
    args = parser.parse_args()
    if args.child:
        if args.device == "cpu":
            # a failed allocation is an honest "over the limit" row, not the kernel's OOM killer
            limit = int(args.memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        method, loss, n, v = args.child
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(child(method, loss, int(n), args.h, int(v), args.repeats, args.device, args.dtype,
                               args.k, bool(args.warmup))))
        return

    torch.set_num_threads(args.threads)
    methods = [f"fused:{c}" for c in args.chunks] if args.sweep else args.methods
    rates = {v: matmul_rate(args.h, v, 1024, args.device, args.dtype) for v in args.vs}
    rows: list[dict] = []
    load_before = load()
    for _ in range(args.rounds):
        for n in args.ns:
            for v in args.vs:
                for loss in args.losses:
                    for method in methods:
                        row = run_child(args, method, loss, n, v)
                        row["load"] = load()
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    rates_after = {v: matmul_rate(args.h, v, 1024, args.device, args.dtype) for v in args.vs}
    best = {v: max(rates[v], rates_after[v]) for v in args.vs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sgemm_gflops": best, "sgemm_before_after": [rates, rates_after],
                               "threads": args.threads, "device": args.device, "dtype": args.dtype,
                               "load_before": load_before, "load_after": load(), "rows": rows}, indent=2) + "\n")
    if args.sweep:
        print_sweep(rows, args)
    else:
        print_table(rows, best, args)


def print_sweep(rows: list[dict], args: argparse.Namespace) -> None:
    """Per (N, V): the time at each chunk size, and how far the default chunk is from the best."""
    from potstill.losses.fused import default_chunk_size

    print("\n| N | V | " + " | ".join(f"chunk {c}" for c in args.chunks) + " | default | default / best |")
    print("|---|---|" + "---|" * (len(args.chunks) + 2))
    for n, v in sorted({(r["n"], r["v"]) for r in rows}):
        seconds = {int(r["method"].split(":")[1]): r["seconds"] for r in rows
                   if (r["n"], r["v"]) == (n, v) and "error" not in r}
        default = default_chunk_size(n, v)
        cells = [f"{seconds[c]:.2f} s ({r_mb(rows, n, v, c):,.0f} MB)" if c in seconds else "—" for c in args.chunks]
        ratio = f"{seconds[default] / min(seconds.values()):.2f}×" if default in seconds else "—"
        print(f"| {n} | {v:,} | " + " | ".join(cells) + f" | {default} | {ratio} |")


def r_mb(rows: list[dict], n: int, v: int, chunk: int) -> float:
    return next(r["peak_mb"] for r in rows if (r["n"], r["v"], r["method"]) == (n, v, f"fused:{chunk}"))


def print_table(rows: list[dict], rate: dict, args: argparse.Namespace) -> None:
    """One line per (N, V, loss, method): the best round, ratios against naive (or the memory limit)."""
    keys = sorted({(r["n"], r["v"], r["loss"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    best: dict[tuple, dict] = {}
    for key in keys:
        ok = [r for r in rows if (r["n"], r["v"], r["loss"], r["method"]) == key and "error" not in r]
        best[key] = min(ok, key=lambda r: r["seconds"]) if ok else \
            next(r for r in rows if (r["n"], r["v"], r["loss"], r["method"]) == key)
    print(f"\nsgemm rate (GFLOP/s, {args.threads} thread(s)): "
          + ", ".join(f"V={v:,}: {g:.0f}" for v, g in rate.items()) + "\n")
    print("| N | V | loss | method | chunk | time (s) | working memory (MB) | time / naive | memory / naive |"
          " rate / sgemm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    limit_mb = args.memory_limit_gb * 1024
    for key in keys:
        row = best[key]
        n, v, loss, method = key
        naive = best.get((n, v, loss, "naive"))
        if "error" in row:
            print(f"| {n} | {v:,} | {loss} | {method} | | failed (> {args.memory_limit_gb:g} GB limit?): "
                  f"{row['error'][:60]} | | | | |")
            continue
        if naive is not None and "error" not in naive:
            ratio_t = f"{row['seconds'] / naive['seconds']:.2f}×"
            ratio_m = f"{row['peak_mb'] / naive['peak_mb']:.2f}×"
        else:
            ratio_t = "—"
            ratio_m = f"< {row['peak_mb'] / limit_mb:.2f}×" if naive is not None else "—"
        print(f"| {n} | {v:,} | {loss} | {method} | {row.get('chunk') or ''} | {row['seconds']:.2f} | "
              f"{row['peak_mb']:,.0f} | {ratio_t} | {ratio_m} | "
              f"{row['gflops'] / (row.get('sgemm_gflops') or rate[v]):.0%} |")


if __name__ == "__main__":
    main()
