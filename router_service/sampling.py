"""Sampling parameters and next-token choice: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # 1 = off
    top_k: int = 0             # 0 = off
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature must be finite and in [0, 100], got {self.temperature!r}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed!r}")

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        return torch.Generator().manual_seed(seed % 2**63)


def sample(logits_V: torch.Tensor, p: SamplingParams, g: torch.Generator | None) -> int:
    if p.temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / p.temperature
    if 0 < p.top_k < logits_V.shape[-1]:
        kth = torch.topk(logits_V, p.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_V, idx_V = torch.sort(logits_V, descending=True)
        cum_V = sorted_V.softmax(-1).cumsum(-1)
        drop_V = cum_V - sorted_V.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        logits_V = logits_V.scatter(0, idx_V, sorted_V.masked_fill(drop_V, -math.inf))
    return int(torch.multinomial(logits_V.softmax(-1), 1, generator=g))
