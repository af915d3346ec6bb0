"""Decode steps replayed from CUDA graphs.

A decode step (every running sequence adds one token) runs the same kernels each time for a given
number of rows and attended positions: captured once per bucket of those two, it then costs one
launch per piece instead of a few hundred. Row r of such a step is the KV pool's slot r
(`model.decode_step`), so the bucket of R rows serves every step whose sequences sit in slots
below R; the rows of free slots ride along and are discarded.

The graphs split at the expert call, as vLLM's piecewise graphs split at their attention and MoE
ops: piece L adds layer L-1's expert outputs to the residual stream, then runs layer L's attention
and routing up to the rows grouped by expert; between pieces the dispatcher runs the experts
eagerly (one host wait per layer, for the row counts). A dispatcher that runs the experts from row
counts on the device (`on_device`: the in-process experts on a GPU in bfloat16) goes inside
instead, and the whole step is one graph with no host wait.

`capture=False` runs the same pieces eagerly, on any device: the tests compare it with the graphs
and with the engine's ordinary step.
"""
from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

from moe_core.config import MoEConfig
from router_service import model


def row_buckets(n_slots: int) -> list[int]:
    """1, 2, 4, 8, then steps of an eighth of the octave (at least 8), up to the pool's slot count."""
    sizes, n = [1, 2, 4, 8], 8
    while n < n_slots:
        n += max(8, 1 << (n.bit_length() - 4))
        sizes.append(n)
    return sorted({min(s, n_slots) for s in sizes})


def context_bucket(S: int, max_len: int) -> int:
    """The positions a step attends over: S rounded up to a multiple of 128 or of an eighth of its
    octave, whichever is larger, and at most the pool's length."""
    step = max(128, 1 << max(0, S.bit_length() - 4))
    return min(-(-S // step) * step, max_len)


class _Bucket:
    """One bucket's decode step as pieces over tensors that stay put, so that graphs can replay it."""

    def __init__(self, graphs: DecodeGraphs, R: int, S: int):
        self.g, self.R, self.S = graphs, R, S
        cfg, w = graphs.cfg, graphs.weights
        self.meta_I = torch.zeros(4 * R, dtype=torch.int64, device=w.device)
        self.tokens_R, self.pos_R, self.live_R, self.order_R = self.meta_I.split(R)  # order: batch row -> slot
        inside = graphs.experts is not None
        self.y_NH = [None if inside else w.embed.new_zeros(R * cfg.top_k, cfg.hidden_size)
                     for _ in range(cfg.n_layers)]   # the experts' outputs: written between pieces
        self.routed: list[model.Routed | None] = [None] * cfg.n_layers
        self.counts_LE = torch.zeros(cfg.n_layers, cfg.n_experts, dtype=torch.int64, device=w.device)
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def piece(self, L: int) -> None:
        """Layer L-1's combine, then layer L up to its routed rows (L == n_layers: the final norm)."""
        g, cfg, w = self.g, self.g.cfg, self.g.weights
        if L == 0:
            self.step = model.decode_step(cfg, self.tokens_R, self.pos_R, self.S, w.dtype)
            self.h_RH = F.embedding(self.tokens_R, w.embed)
        else:
            self.h_RH = self.h_RH + model.combine(self.routed[L - 1], self.y_NH[L - 1], self.R)
        if L == cfg.n_layers:
            self.out_RH = model.rms_norm(self.h_RH, w.norm, cfg.rms_norm_eps)
            return
        lw = w.layers[L]
        self.h_RH, x_RH = model.attention_block(cfg, lw, L, self.h_RH, self.step, g.pool)
        r = self.routed[L] = model.route_rows(x_RH, lw.gate, cfg.top_k)
        self.counts_LE[L].zero_().index_add_(0, r.expert_N, self.live_R[r.token_N])  # live rows only
        if g.experts is not None:
            self.y_NH[L] = g.experts(L, r.x_NH, r.counts_E)

    def pieces(self) -> list:
        n = self.g.cfg.n_layers
        if self.g.experts is not None:
            return [lambda: [self.piece(L) for L in range(n + 1)]]
        return [lambda L=L: self.piece(L) for L in range(n + 1)]

    def record(self) -> None:
        """Each piece run once eagerly on a side stream, then captured. The step's own metadata is in
        place already, so whatever these runs write to the KV pool the replay that follows rewrites."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for piece in self.pieces():
                piece()
        torch.cuda.current_stream().wait_stream(side)
        for piece in self.pieces():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.g.mempool, capture_error_mode="thread_local"):
                piece()
            self.graphs.append(graph)


class DecodeGraphs:
    def __init__(self, cfg: MoEConfig, weights: model.DenseWeights, pool: model.KVPool, dispatcher, *,
                 capture: bool = True):
        self.cfg, self.weights, self.pool, self.dispatcher, self.capture = cfg, weights, pool, dispatcher, capture
        on_device = getattr(dispatcher, "on_device", None)
        self.experts = on_device(cfg.n_layers, cfg.n_experts) if on_device else None  # run inside the graph
        self.rows = row_buckets(pool.n_slots)
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.mempool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, slots: list[int], positions: list[int]) -> tuple[int, int]:
        R = self.rows[bisect.bisect_left(self.rows, max(slots) + 1)]
        return R, context_bucket(max(positions) + 1, self.pool.max_len)

    async def step(self, tokens: list[int], positions: list[int], slots: list[int],
                   deadline: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [B, H] of one decode step (row b: token b at positions[b], in slots[b]),
        and the rows each expert got in each layer [L, E] (on the device)."""
        R, S = self.bucket(slots, positions)
        tokens_R, pos_R, live_R, order_R = [0] * R, [0] * R, [0] * R, [0] * R
        for b, (t, p, s) in enumerate(zip(tokens, positions, slots)):
            tokens_R[s], pos_R[s], live_R[s], order_R[b] = t, p, 1, s
        b = self.buckets.get((R, S))
        new = b is None
        if new:
            b = self.buckets[R, S] = _Bucket(self, R, S)
        self.pool.staging.to_device(torch.tensor(tokens_R + pos_R + live_R + order_R), b.meta_I.device,
                                     out_I=b.meta_I)
        if new and self.capture:
            b.record()
        for L, piece in enumerate(b.graphs or b.pieces()):
            piece.replay() if self.capture else piece()
            if self.experts is None and L < self.cfg.n_layers:  # the experts between pieces L and L+1
                r = b.routed[L]
                await self.dispatcher.run_experts(L, r.x_NH, r.counts_E.tolist(), deadline, out_NH=b.y_NH[L])
        return b.out_RH.index_select(0, b.order_R[:len(slots)]), b.counts_LE
