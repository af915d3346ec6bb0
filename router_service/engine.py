"""The engine: continuous batching over the model.

Every step runs the new tokens of all running sequences as one flattened batch: prompts of
requests that just joined (prefill) beside one token of each decoding request. A request joins
at the next step and leaves as soon as it finishes, so its output does not depend on its
neighbours. Expert calls go through the dispatcher given, so the same engine runs in-process
(tests, `--local`) and in the router deployment (gRPC to expert replicas).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_core.config import MoEConfig
from moe_core.staging import Staging
from router_service import model
from router_service.graphs import DecodeGraphs
from router_service.sampling import SamplingParams, sample
from router_service.serving import RouterConfig


class Overloaded(RuntimeError):
    """More requests than the engine admits; the caller should answer RESOURCE_EXHAUSTED."""


class RouteStats:
    """Tokens routed to each (layer, expert) since start."""

    def __init__(self, cfg: MoEConfig):
        self._counts = np.zeros((cfg.n_layers, cfg.n_experts), dtype=np.int64)
        self._on_device: torch.Tensor | None = None  # what CUDA-graph steps counted, read back on demand
        self.tokens = 0

    def record(self, layer: int, counts_E: list[int]) -> None:
        self._counts[layer] += counts_E

    def record_all(self, counts_LE: torch.Tensor) -> None:
        """Every layer's counts at once, left on their device (no host wait)."""
        self._on_device = counts_LE.clone() if self._on_device is None else self._on_device.add_(counts_LE)

    @property
    def counts(self) -> np.ndarray:
        if self._on_device is None:
            return self._counts
        return self._counts + self._on_device.cpu().numpy()


@dataclass
class _Sequence:
    tokens: list[int]                   # prompt, then generated
    params: SamplingParams | None       # None: score (all-position logits, no generation)
    out: asyncio.Queue
    prompt_len: int
    generator: torch.Generator | None = None
    deadline: float | None = None       # time.monotonic() by which the caller gives up
    n_new: int = 0
    done: bool = False
    slot: int | None = None             # its place in the engine's KV pool while it runs
    cached: int = 0                     # positions written to its cache
    scored: list = field(default_factory=list)  # a score request's logits, chunk by chunk
    id: int = field(default_factory=itertools.count().__next__)


class Engine:
    def __init__(self, cfg: MoEConfig, weights: model.DenseWeights, dispatcher, *, device=None,
                 max_running: int = RouterConfig.max_running, max_queued: int = RouterConfig.max_queued,
                 max_step_tokens: int = RouterConfig.max_step_tokens, micro_batches: int = RouterConfig.micro_batches,
                 max_seq_len: int | None = None, kv_tokens: int | None = None,
                 kv_memory_fraction: float | None = None, cuda_graphs: bool = RouterConfig.cuda_graphs):
        """`device` (default: the weights') holds the weights, the KV pool and every step's tensors;
        logits come back to the CPU in float32 for sampling, so seeded results do not depend on it.

        The KV pool is allocated here, once: slots of `max_seq_len` positions (default the model's
        context), as many as `kv_tokens` positions hold, or as fit in `kv_memory_fraction` of the
        device's free memory (default half of it on a GPU), at most `max_running`. A step runs at most `max_step_tokens` tokens:
        longer prompts are prefilled in chunks over several steps while decodes go on.

        On a GPU, decode steps replay CUDA graphs (`graphs.DecodeGraphs`) unless `cuda_graphs` is off."""
        self.cfg, self.dispatcher = cfg, dispatcher
        self.device = weights.device if device is None else torch.device(device)
        self.weights = weights.to(self.device)
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        slot_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * self.max_seq_len * cfg.dim_per_head * self.weights.embed.element_size()
        if kv_memory_fraction is None and kv_tokens is None and self.device.type == "cuda":
            kv_memory_fraction = 0.5
        if kv_tokens is not None:
            n_slots = min(max_running, kv_tokens // self.max_seq_len)
        elif kv_memory_fraction is not None and self.device.type == "cuda":
            n_slots = min(max_running, int(torch.cuda.mem_get_info(self.device)[0] * kv_memory_fraction) // slot_bytes)
        else:
            n_slots = max_running
        if n_slots < 1:
            raise ValueError(f"the KV budget holds no sequence of {self.max_seq_len} positions")
        self.pool = model.KVPool(cfg, n_slots, self.max_seq_len, self.weights.dtype, self.device)
        self.graphs = DecodeGraphs(cfg, self.weights, self.pool, dispatcher) \
            if cuda_graphs and self.device.type == "cuda" else None
        self._staging = Staging()  # pinned host memory for the logits (pageable GPU copies are slow)
        self.max_running, self.max_queued, self.max_step_tokens = max_running, max_queued, max_step_tokens
        self.micro_batches = micro_batches
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.stats = RouteStats(cfg)
        self.finished = 0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._step_task: asyncio.Task | None = None
        self._batch: list[_Sequence] = []
        self._abandoned = False
        self.steps_cancelled = 0

    # -- public API ------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams, deadline: float | None = None):
        """Yields (token_id, finish_reason or None) one step at a time."""
        seq = self._submit(prompt, params, len(prompt) + params.max_new_tokens, deadline)
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[1] is not None:
                    return
        finally:
            self._drop(seq)  # a consumer that stops early (cancelled stream) frees its slot

    async def complete(self, prompt: list[int], params: SamplingParams,
                       deadline: float | None = None) -> tuple[list[int], str]:
        tokens, reason = [], None
        async for tok, reason in self.generate(prompt, params, deadline):
            tokens.append(tok)
        return tokens, reason

    async def score(self, tokens: list[int], deadline: float | None = None) -> torch.Tensor:
        """float32 logits [T, V] for every position of `tokens`."""
        seq = self._submit(tokens, None, len(tokens), deadline)
        try:
            item = await seq.out.get()
        finally:
            self._drop(seq)
        if isinstance(item, BaseException):
            raise item
        return item

    def check_prompt(self, prompt: list[int], max_new_tokens: int = 0) -> None:
        if not prompt:
            raise ValueError("prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range [0, {self.cfg.vocab_size})")
        room = self.max_seq_len
        if len(prompt) + max_new_tokens > room:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the context of {room} tokens")

    # -- scheduling ------------------------------------------------------------------

    def _submit(self, prompt, params, capacity, deadline) -> _Sequence:
        self.check_prompt(prompt, params.max_new_tokens if params else 0)
        # Counted whole rather than by queue length: a burst that arrives before the loop admits
        # anyone must meet the same limit as one that arrives while it runs.
        live = sum(not s.done for s in itertools.chain(self.running, self.waiting))
        if live >= self.max_running + self.max_queued:
            raise Overloaded(f"{live} requests in flight or queued "
                             f"(limits: {self.max_running} running + {self.max_queued} queued)")
        seq = _Sequence(list(prompt), params, asyncio.Queue(), len(prompt),
                        params.generator() if params else None, deadline)
        self.waiting.append(seq)
        if self._loop_task is None or self._loop_task.done():  # first use, or a new event loop
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        self._wake.set()
        return seq

    @property
    def load(self) -> dict:
        return {"running": len(self.running), "queued": len(self.waiting)}

    async def _loop(self):
        while True:
            self._expire()
            self.running = [s for s in self.running if not s.done]
            self._admit()
            if not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self.running)
            deadlines = [s.deadline for s in batch]
            # The step serves everyone in it, so it may run until the latest deadline among them.
            deadline = None if None in deadlines else max(deadlines)
            # A task of its own, so that `_drop` can cancel it (and its expert calls) once every
            # sequence in it has been given up.
            self._batch, self._abandoned = batch, False
            self._step_task = asyncio.get_running_loop().create_task(self._step(batch, deadline))
            try:
                await self._step_task
            except asyncio.CancelledError:
                # The loop itself is being stopped (perhaps while an abandoned step winds down).
                if not self._abandoned or asyncio.current_task().cancelling():
                    raise
                self.steps_cancelled += 1
            except Exception as e:  # the step's sequences fail together; others carry on
                for s in batch:
                    if not s.done:
                        self._end(s, e)
            finally:
                self._batch, self._step_task = [], None

    def _end(self, seq: _Sequence, item=None) -> None:
        """Done: its slot goes back to the pool at once (a step still in flight may write it, but
        slots are handed out only between steps)."""
        seq.done = True
        if item is not None:
            seq.out.put_nowait(item)
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None

    def _drop(self, seq: _Sequence) -> None:
        self._end(seq)
        step = self._step_task
        if step is not None and not step.done() and any(s is seq for s in self._batch) \
                and all(s.done for s in self._batch):
            self._abandoned = True
            step.cancel()

    def _expire(self):
        now = time.monotonic()
        for s in itertools.chain(self.running, self.waiting):
            if not s.done and s.deadline is not None and now > s.deadline:
                self._end(s, TimeoutError("deadline exceeded"))

    def _admit(self):
        # A request needs a slot of the pool; without one it waits in the queue (FIFO).
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.done:
                self.waiting.popleft()
                continue
            seq.slot = self.pool.alloc()
            if seq.slot is None:
                break
            self.running.append(self.waiting.popleft())

    def _plan(self, batch: list[_Sequence]) -> list[tuple[_Sequence, int]]:
        """(sequence, tokens it runs) for this step: every decode gets its token, then prompts (in
        arrival order) take what is left of the step's token budget, a chunk at a time."""
        pending = [(s, len(s.tokens) - s.cached) for s in batch]
        budget = self.max_step_tokens - sum(n for _, n in pending if n == 1)
        plan = []
        for s, n in pending:
            if n > 1:
                n = min(n, budget)
                budget -= n
            if n > 0:
                plan.append((s, n))
        return plan

    async def _step(self, batch: list[_Sequence], deadline: float | None):
        # Micro-batches run as concurrent coroutines: while one waits for its experts, the next
        # runs its attention (ping-pong overlap). Sequences are independent, so results are the same.
        groups = _split(self._plan(batch), self.micro_batches)
        if self.graphs is not None and len(groups) == 1 and all(n == 1 for _, n in groups[0]):
            outs = [await self._decode(groups[0], deadline)]  # alone: its free slots' rows write position 0 of free slots
        else:
            outs = await asyncio.gather(*(self._forward(g, deadline) for g in groups))
        for group, (segments, h_TH) in zip(groups, outs):
            self._emit(group, segments, h_TH)

    async def _forward(self, group: list[tuple[_Sequence, int]], deadline: float | None):
        segments, tokens = [], []
        for s, n in group:
            segments.append(model.Segment(s.slot, s.cached, n))
            tokens += s.tokens[s.cached:s.cached + n]
        h_TH = await model.forward(self.cfg, self.weights, self.pool, tokens, segments,
                                   self.dispatcher, on_route=self.stats.record, deadline=deadline)
        for s, n in group:
            s.cached += n
        self.stats.tokens += len(tokens)
        return segments, h_TH

    async def _decode(self, group: list[tuple[_Sequence, int]], deadline: float | None):
        """A step of one token per sequence, from the decode graphs."""
        h_TH, counts_LE = await self.graphs.step([s.tokens[s.cached] for s, _ in group],
                                                 [s.cached for s, _ in group], [s.slot for s, _ in group], deadline)
        self.stats.record_all(counts_LE)
        for s, _ in group:
            s.cached += 1
        self.stats.tokens += len(group)
        return [model.Segment(s.slot, s.cached - 1, 1) for s, _ in group], h_TH

    def _emit(self, group: list[tuple[_Sequence, int]], segments: list[model.Segment], h_TH: torch.Tensor):
        ends = list(itertools.accumulate(seg.length for seg in segments))
        # One lm_head GEMM over every sequence's last position, one argmax on its device for the greedy
        # ones; only the sampled sequences' logits come to the CPU.
        last_BH = h_TH if len(ends) == h_TH.shape[0] else h_TH[[end - 1 for end in ends]]
        logits_BV = model.logits(self.weights, last_BH)
        greedy_B = self._staging.to_host(logits_BV.argmax(-1)).tolist()
        sampled = [b for b, (s, _) in enumerate(group) if s.params is not None and s.params.temperature != 0]
        sampled_logits = dict(zip(sampled, self._to_cpu(logits_BV[sampled]))) if sampled else {}
        for b, ((s, _), seg, end) in enumerate(zip(group, segments, ends)):
            if s.done:
                continue
            if s.params is None:
                s.scored.append(self._to_cpu(model.logits(self.weights, h_TH[end - seg.length:end])))
                if s.cached == len(s.tokens):
                    self._end(s, torch.cat(s.scored))
                    self.finished += 1
                continue
            if s.cached < len(s.tokens):
                continue  # a prompt's chunk before its last: no token yet
            try:
                tok = greedy_B[b] if s.params.temperature == 0 else sample(sampled_logits[b], s.params, s.generator)
            except Exception as e:  # one sequence's sampling fault must not fail its neighbours
                self._end(s, e)
                continue
            s.tokens.append(tok)
            s.n_new += 1
            reason = None
            if tok == self.cfg.eos_token_id:
                reason = "stop"
            elif s.n_new >= s.params.max_new_tokens or len(s.tokens) >= self.max_seq_len:
                reason = "length"
            s.out.put_nowait((tok, reason))
            if reason:
                self._finish(s)

    def _to_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """float32 on the CPU; from a GPU a tensor of its own (the staging buffer is reused)."""
        return self._staging.to_host(x).to(torch.float32, copy=x.is_cuda)

    def _finish(self, s: _Sequence):
        self._end(s)
        self.finished += 1


def _split(batch: list[tuple[_Sequence, int]], n: int) -> list[list[tuple[_Sequence, int]]]:
    """At most n contiguous groups of about equal token counts (no empty group)."""
    if n <= 1 or len(batch) < 2:
        return [batch]
    total, groups, cur, acc = sum(size for _, size in batch), [], [], 0
    for item in batch:
        size = item[1]
        cur.append(item)
        acc += size
        if acc >= total * (len(groups) + 1) / n and len(groups) < n - 1:
            groups.append(cur)
            cur = []
    return groups + [cur] if cur else groups


def local_engine(model_dir, device="cpu", dtype=torch.float32, **limits) -> Engine:
    """Everything in this process, on `device` in `dtype`: dense weights, every expert, the
    in-process dispatcher."""
    from expert_service.experts import ExpertShard
    from moe_core.checkpoint import Checkpoint, all_pairs
    from router_service.dispatch import InProcessDispatcher

    ckpt = Checkpoint(model_dir)
    shard = ExpertShard.load(ckpt, all_pairs(ckpt.config), device=device, dtype=dtype)
    weights = model.DenseWeights.load(ckpt, dtype=dtype, device=device)
    return Engine(ckpt.config, weights, InProcessDispatcher(shard), **limits)
