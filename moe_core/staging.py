"""Host <-> GPU copies through reused pinned buffers.

Copies between pageable host memory and a GPU are orders of magnitude slower than pinned ones on
some machines (the lent H200 machines among them), so tensors bound for or coming from the wire
pass through page-locked staging.
One Staging per event loop: each result is valid until the next call on the same object.
"""
from __future__ import annotations

import torch


class Staging:
    def __init__(self):
        self._buf: torch.Tensor | None = None  # uint8, pinned, grown to the largest request

    def _host(self, nbytes: int) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)
        return self._buf[:nbytes]

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU copy of a GPU tensor (a view of the staging buffer); CPU tensors pass through."""
        if not t.is_cuda:
            return t
        host = self._host(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        host.copy_(t)
        return host

    def to_device(self, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        if t.is_cuda or torch.device(device).type != "cuda":  # no pageable host memory involved
            return t.to(device, dtype or t.dtype)
        host = self._host(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        host.copy_(t)
        return host.to(device, non_blocking=False).to(dtype or t.dtype)
