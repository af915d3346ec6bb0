"""Question: how close do a layer's experts come to the GPU's matmul rate, per-expert loop or grouped GEMM?

One layer's eight experts at Mixtral-8x7B shapes (bf16, random weights) on the rows a top-2 gate
routes from T tokens, timed three ways: the per-expert loop (two cuBLAS GEMMs and the SwiGLU per
expert) with the SwiGLU eager (`loop`: silu, then the product) or compiled into one elementwise
kernel (`loop, compiled swiglu`), and one grouped GEMM over every expert (`grouped`:
`torch._grouped_mm`, CUTLASS). TFLOP/s counts 2 * 3 * rows * hidden * intermediate; `of_gemm_peak`
divides by one large plain matmul measured in the same run. `rel_err` = |way - loop| / |loop|
(bf16 rounding: about 1e-3 or less). ExpertShard runs the loop: the grouped GEMM lost at every
size on an H200 (BENCHMARKS.md).

    python -m benchmarks.expert_math [--tokens 512,1024,2048,4096,8192] [--preset mixtral-8x7b]
"""
from __future__ import annotations

import argparse
import itertools
import tempfile

import torch

from benchmarks.common import measure, run, save
from benchmarks.moe_layer import gemm_tflops, layer_checkpoint
from expert_service.experts import ExpertShard, compiled_swiglu, swiglu
from router_service import model


def grouped_ffn(x_TH: torch.Tensor, w13_G2IH: torch.Tensor, w2_GHI: torch.Tensor, rows_G: list[int]) -> torch.Tensor:
    """fused_ffn for G experts in one grouped GEMM each way: rows of x_TH grouped by expert, rows_G[g] for g."""
    offs_G = torch.tensor(list(itertools.accumulate(rows_G)), dtype=torch.int32).to(x_TH.device)
    gate_TI, up_TI = torch._grouped_mm(x_TH, w13_G2IH.transpose(1, 2), offs=offs_G).chunk(2, dim=-1)
    return torch._grouped_mm(swiglu(gate_TI, up_TI), w2_GHI.transpose(1, 2), offs=offs_G)  # [T, H]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--tokens", default="512,1024,2048,4096,8192")
    p.add_argument("--name", default="expert_math")
    a = p.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 and hasattr(torch, "_grouped_mm")):
        raise SystemExit("needs a GPU of compute capability 9 or more and torch with _grouped_mm")
    with tempfile.TemporaryDirectory() as d:
        ckpt = layer_checkpoint(a.preset, d, dtype)
        cfg = ckpt.config
        shard = ExpertShard.load(ckpt, [(0, e) for e in range(cfg.n_experts)], device=device, dtype=dtype, act=swiglu)
        gate = model.DenseWeights.load(ckpt).layers[0].gate.to(device, dtype)
    compiled_shard = ExpertShard(shard.weights, act=compiled_swiglu(device, dtype, cfg.intermediate_size))
    w13 = torch.stack([shard.fused[0, e][0] for e in range(cfg.n_experts)])  # [E, 2I, H]
    w2 = torch.stack([shard.fused[0, e][1] for e in range(cfg.n_experts)])   # [E, H, I]
    peak = gemm_tflops(device, dtype)
    rows = []
    for T in (int(t) for t in a.tokens.split(",")):
        x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(device, dtype)
        _, idx = model.route(x, gate, cfg.top_k)
        order = idx.flatten().argsort(stable=True)
        xs = x[order // cfg.top_k]
        counts = torch.bincount(idx.flatten(), minlength=cfg.n_experts).tolist()
        segs = [(0, e, n) for e, n in enumerate(counts)]
        flops = 2 * 3 * xs.shape[0] * cfg.hidden_size * cfg.intermediate_size
        outs = {}
        ways = {"loop": lambda: shard.forward(xs, segs),
                "loop, compiled swiglu": lambda: compiled_shard.forward(xs, segs),
                "grouped": lambda: grouped_ffn(xs, w13, w2, counts)}
        for way, fn in ways.items():
            async def math():
                outs[way] = fn()
            r = run(measure(math, sync=torch.cuda.synchronize, warmup=2))
            tflops = flops / r["ms"] / 1e9
            rows.append({"T": T, "rows": xs.shape[0], "way": way, "ms": r["ms"], "p90_ms": r["p90_ms"],
                         "tflops": tflops, "of_gemm_peak": tflops / peak})
            if way != "loop":
                loop, other = outs["loop"].float(), outs[way].float()
                rows[-1]["rel_err"] = ((other - loop).norm() / loop.norm()).item()
                rows[-1]["speedup"] = loop_ms / rows[-1]["ms"]
            else:
                loop_ms = r["ms"]
            print(rows[-1], flush=True)
    save(a.name, rows, {"preset": a.preset, "dtype": "bfloat16", "gemm_tflops": peak},
         ["T", "rows", "way", "ms", "p90_ms", "tflops", "of_gemm_peak", "speedup", "rel_err"])


if __name__ == "__main__":
    main()
