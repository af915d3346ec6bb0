"""Question: what does one decode step's expert math cost at best on this machine, in one process?

The floor under any end-to-end figure: a decode step at batch B routes B * top_k rows, about
B * top_k / E per expert, through every layer's experts. Here they run as one batched matmul per
layer and projection (`torch.bmm` over the experts, all of this process's threads), with no gate,
no transport, no attention and no lm_head: each step must spend at least this much. Shapes from the
preset (`bench`: hidden 512, intermediate 1792, 8 layers, 8 experts, top-2), random float32 weights.

    python -m benchmarks.decode_floor [--preset bench] [--batch 1,8,32]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import measure, run, save
from expert_service.experts import swiglu
from moe_core.config import preset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--name", default="decode_floor")
    a = p.parse_args(argv)
    cfg = preset(a.preset)
    E, H, I = cfg.n_experts, cfg.hidden_size, cfg.intermediate_size
    w13 = [torch.randn(E, 2 * I, H) * 0.02 for _ in range(cfg.n_layers)]  # per layer [E, 2I, H]
    w2 = [torch.randn(E, H, I) * 0.02 for _ in range(cfg.n_layers)]       # per layer [E, H, I]
    rows = []
    for B in (int(b) for b in a.batch.split(",")):
        m = max(1, round(B * cfg.top_k / E))  # rows per expert
        x_EmH = torch.randn(E, m, H)

        async def step():
            for a13, a2 in zip(w13, w2):
                gate, up = torch.bmm(x_EmH, a13.transpose(1, 2)).chunk(2, dim=-1)
                torch.bmm(swiglu(gate, up), a2.transpose(1, 2))
        r = run(measure(step))
        rows.append({"batch": B, "rows_per_expert": m, "ms": r["ms"], "p90_ms": r["p90_ms"],
                     "tokens_per_s_ceiling": B / r["ms"] * 1e3})
        print(rows[-1], flush=True)
    save(a.name, rows, {"preset": a.preset, "threads": torch.get_num_threads()},
         ["batch", "rows_per_expert", "ms", "p90_ms", "tokens_per_s_ceiling"])


if __name__ == "__main__":
    main()
