"""CUDA graphs of decode-size calls on a session's own buffers.

A one-row call into a Mixtral-size expert spends longer launching its kernels from Python than
the GPU spends running them. A call of one (layer, expert) segment with at most `max_rows` rows,
whose rows are read from and written to the session's CUDA buffers in place, is captured once
per (session, layer, expert, rows rounded up to a power of two) and replayed after that: one
launch. The padding rows compute on whatever the buffer holds past the call's rows, and land past
them in the output, which the client does not read. The graphs hold the buffers' addresses, so a
session's graphs go with the session (`drop`).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from expert_service.experts import ExpertShard


class SessionGraphs:
    def __init__(self, shard: ExpertShard, max_rows: int = 256, max_graphs: int = 512):
        self.shard, self.max_rows, self.max_graphs = shard, max_rows, max_graphs
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()  # least recently used first
        self.captured = 0

    def run(self, session: str, x_TH: torch.Tensor, out_TH: torch.Tensor, segments) -> bool:
        """Runs the call from a graph and returns True, or False when it is not one to capture.
        x_TH and out_TH are the session's buffers (views from row 0) holding at least the padded rows."""
        if len(segments) != 1 or not 0 < segments[0][2] <= self.max_rows:
            return False
        layer, expert, rows = segments[0]
        padded = 1 << (rows - 1).bit_length()
        if padded > x_TH.shape[0] or padded > out_TH.shape[0]:
            return False
        key = (session, layer, expert, padded)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(x_TH[:padded], out_TH[:padded], [(layer, expert, padded)])
            self.graphs[key] = graph
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph.replay()
        return True

    def _capture(self, x_TH, out_TH, segments) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream(x_TH.device)
        stream.wait_stream(torch.cuda.current_stream(x_TH.device))
        with torch.cuda.stream(stream):  # once eagerly first: cuBLAS sets up its workspace outside the capture
            self.shard.forward(x_TH, segments, out_TH=out_TH)
        torch.cuda.current_stream(x_TH.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # A private pool each: captures on this thread into one shared pool tripped the caching
        # allocator's pool accounting (an internal assert in torch 2.11).
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.shard.forward(x_TH, segments, out_TH=out_TH)
        self.captured += 1
        return graph

    def drop(self, session: str) -> None:
        for key in [k for k in self.graphs if k[0] == session]:
            del self.graphs[key]
