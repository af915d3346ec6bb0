"""Expert FFN math: Mixtral's SwiGLU expert, w2(silu(w1 x) * w3 x), and a shard of them.

Legend: T tokens, H hidden size, I intermediate size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core.checkpoint import Checkpoint, expert_keys, expert_shapes
from moe_core.config import MoEConfig


def expert_ffn(x_TH: torch.Tensor, w1_IH: torch.Tensor, w2_HI: torch.Tensor, w3_IH: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_TH, w1_IH)) * F.linear(x_TH, w3_IH), w2_HI)  # [T, H]


def fused_ffn(x_TH: torch.Tensor, w13_2IH: torch.Tensor, w2_HI: torch.Tensor, out_TH=None) -> torch.Tensor:
    """expert_ffn with w1 and w3 stacked: one GEMM twice as wide instead of two (pays on GPUs);
    the down projection writes straight into `out_TH` when given."""
    gate_TI, up_TI = F.linear(x_TH, w13_2IH).chunk(2, dim=-1)
    return torch.matmul(F.silu(gate_TI) * up_TI, w2_HI.t(), out=out_TH)  # [T, H]


class ExpertShard:
    """The (layer, expert) FFNs one replica serves, and nothing else.

    w1 and w3 are kept stacked as w13 [2I, H]; `weights` exposes (w1, w2, w3) as views of it. The
    experts run one after another: one grouped GEMM over them was slower on an H200 at every size
    measured (benchmarks/expert_math.py).
    """

    def __init__(self, weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.fused = {k: (torch.cat([w1, w3]), w2) for k, (w1, w2, w3) in weights.items()}
        self.weights = {k: (w13[:w13.shape[0] // 2], w2, w13[w13.shape[0] // 2:]) for k, (w13, w2) in self.fused.items()}

    @classmethod
    def load(cls, ckpt: Checkpoint, pairs, *, device="cpu", dtype=torch.float32) -> ExpertShard:
        pairs = sorted(set(pairs))
        tensors = ckpt.load(expert_shapes(ckpt.config, pairs), dtype=dtype, desc="loading experts")
        return cls({(L, E): tuple(tensors[k].to(device) for k in expert_keys(L, E)) for L, E in pairs})

    @classmethod
    def from_state(cls, cfg: MoEConfig, state: dict[str, torch.Tensor], pairs) -> ExpertShard:
        return cls({(L, E): tuple(state[k] for k in expert_keys(L, E)) for L, E in pairs})

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(self.weights)

    def forward(self, x_TH: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """Rows of x_TH grouped by (layer, expert, rows) segments, in order; returns [T, H]."""
        out_TH = torch.empty_like(x_TH)
        start = 0
        for layer, expert, rows in segments:
            if rows:
                fused_ffn(x_TH[start:start + rows], *self.fused[(layer, expert)], out_TH=out_TH[start:start + rows])
            start += rows
        return out_TH
