"""Expert FFN math: Mixtral's SwiGLU expert, w2(silu(w1 x) * w3 x), and a shard of them.

Legend: T tokens, H hidden size, I intermediate size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core.checkpoint import Checkpoint, expert_keys, expert_shapes
from moe_core.config import MoEConfig
from moe_core.staging import Staging


def expert_ffn(x_TH: torch.Tensor, w1_IH: torch.Tensor, w2_HI: torch.Tensor, w3_IH: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_TH, w1_IH)) * F.linear(x_TH, w3_IH), w2_HI)  # [T, H]


def swiglu(gate_TI: torch.Tensor, up_TI: torch.Tensor) -> torch.Tensor:
    return F.silu(gate_TI) * up_TI


def fused_ffn(x_TH: torch.Tensor, w13_2IH: torch.Tensor, w2_HI: torch.Tensor, out_TH=None, act=swiglu) -> torch.Tensor:
    """expert_ffn with w1 and w3 stacked: one GEMM twice as wide instead of two (pays on GPUs);
    the down projection writes straight into `out_TH` when given."""
    gate_TI, up_TI = F.linear(x_TH, w13_2IH).chunk(2, dim=-1)
    return torch.matmul(act(gate_TI, up_TI), w2_HI.t(), out=out_TH)  # [T, H]


def compiled_swiglu(device, dtype: torch.dtype, intermediate: int, min_rows: int = 512):
    """swiglu as one generated elementwise kernel (reads gate and up, writes the product) instead of
    two eager ones (silu, then the product: five tensor-sized passes instead of three), for calls of
    at least `min_rows` rows: below that, the compiled function's own per-call cost outweighs the
    saved passes (benchmarks/expert_math.py on an H200: 2-3% faster expert math at 1024+ rows per
    expert; compiled at every size, 0.77x at 256 rows per expert, T=1024).
    Compiled here, once, for any row count, so no call waits for the compiler."""
    compiled = torch.compile(swiglu, dynamic=True)
    for rows in (7, 9):  # two sizes: should the first compile specialise on its shape, the second is dynamic
        compiled(*torch.randn(rows, 2 * intermediate, device=device, dtype=dtype).chunk(2, dim=-1))

    def act(gate_TI: torch.Tensor, up_TI: torch.Tensor) -> torch.Tensor:
        return (compiled if gate_TI.shape[0] >= min_rows else swiglu)(gate_TI, up_TI)
    return act


def default_act(device, dtype: torch.dtype, intermediate: int):
    """The compiled swiglu on a GPU where Triton is installed, the eager one elsewhere."""
    if torch.device(device).type != "cuda":
        return swiglu
    try:
        import triton  # noqa: F401
    except ImportError:
        return swiglu
    return compiled_swiglu(device, dtype, intermediate)


class ExpertShard:
    """The (layer, expert) FFNs one replica serves, and nothing else.

    w1 and w3 are kept stacked as w13 [2I, H], and the experts of a layer side by side in one tensor
    ([E, 2I, H] and [E, H, I]); `fused` and `weights` expose each expert's as views of them. The
    experts run one after another when their row counts are on the host (one grouped GEMM was slower
    on an H200 at every size measured, benchmarks/expert_math.py); `grouped` runs a layer's from row
    counts on the device, with no host wait.
    """

    def __init__(self, weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], act=swiglu):
        self.act = act
        self.stacked: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}  # layer: (experts, w13_E2IH, w2_EHI)
        for layer in sorted({L for L, _ in weights}):
            experts = sorted(e for L, e in weights if L == layer)
            w13 = torch.stack([torch.cat([weights[layer, e][0], weights[layer, e][2]]) for e in experts])
            self.stacked[layer] = (experts, w13, torch.stack([weights[layer, e][1] for e in experts]))
        self.fused = {(L, e): (w13[i], w2[i]) for L, (experts, w13, w2) in self.stacked.items()
                      for i, e in enumerate(experts)}
        self.weights = {k: (w13[:w13.shape[0] // 2], w2, w13[w13.shape[0] // 2:]) for k, (w13, w2) in self.fused.items()}

    @classmethod
    def load(cls, ckpt: Checkpoint, pairs, *, device="cpu", dtype=torch.float32, act=None) -> ExpertShard:
        """`act` defaults to default_act(device)."""
        pairs = sorted(set(pairs))
        tensors = ckpt.load(expert_shapes(ckpt.config, pairs), dtype=dtype, desc="loading experts")
        stage = Staging()  # to a GPU through pinned memory (pageable copies are slow there)
        return cls({(L, E): tuple(stage.to_device(tensors.pop(k), device) for k in expert_keys(L, E)) for L, E in pairs},
                   act=act or default_act(device, dtype, ckpt.config.intermediate_size))

    @classmethod
    def from_state(cls, cfg: MoEConfig, state: dict[str, torch.Tensor], pairs) -> ExpertShard:
        return cls({(L, E): tuple(state[k] for k in expert_keys(L, E)) for L, E in pairs})

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(self.weights)

    def forward(self, x_TH: torch.Tensor, segments: list[tuple[int, int, int]], out_TH=None) -> torch.Tensor:
        """Rows of x_TH grouped by (layer, expert, rows) segments, in order; returns [T, H] (out_TH
        when given)."""
        out_TH = torch.empty_like(x_TH) if out_TH is None else out_TH
        start = 0
        for layer, expert, rows in segments:
            if rows:
                fused_ffn(x_TH[start:start + rows], *self.fused[(layer, expert)], out_TH=out_TH[start:start + rows],
                          act=self.act)
            start += rows
        return out_TH

    def can_group(self, layer: int, n_experts: int) -> bool:
        """Whether `grouped` serves this layer: every one of its experts here, on a GPU in bfloat16
        (torch's grouped GEMM reads the row counts on the device only there), rows 16-byte aligned."""
        entry = self.stacked.get(layer)
        if entry is None or entry[0] != list(range(n_experts)):
            return False
        w13 = entry[1]
        return w13.is_cuda and w13.dtype == torch.bfloat16 and w13.shape[-1] % 8 == 0 and w13.shape[1] % 16 == 0

    def grouped(self, layer: int, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """A whole layer's experts over rows grouped by expert, `counts_E` rows each (a device tensor):
        one grouped GEMM up, one down, no host wait (CUDA-graph capturable)."""
        _, w13_E2IH, w2_EHI = self.stacked[layer]
        offs_E = counts_E.cumsum(0).to(torch.int32)
        gate_NI, up_NI = torch._grouped_mm(x_NH, w13_E2IH.transpose(1, 2), offs=offs_E).chunk(2, dim=-1)
        return torch._grouped_mm(self.act(gate_NI, up_NI), w2_EHI.transpose(1, 2), offs=offs_E)  # [N, H]
