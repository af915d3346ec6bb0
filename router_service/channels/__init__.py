"""How one expert call's rows reach one replica and come back: a Channel per way of moving them.

    await channel.forward(x_TH, segments, timeout=..., out=None) -> y_TH
    await channel.close()

`segments` are (layer, expert, rows) in row order; y_TH holds the experts' unweighted outputs
row for row, on x_TH's device in its dtype, written into `out` when given.

- "grpc" (grpc_bytes.BytesChannel): the rows as bytes in an ExpertService call; the way between
  nodes.
- "shm", "cuda_ipc" (session.SessionChannel): a same-node session: the rows through memory
  shared with the replica, each call's envelope through the session's ring.
- "handle" (handle.HandleChannel): a Serve deployment handle, Ray's own transport (the baseline).

Whichever the channel, a failed call raises grpc.aio.AioRpcError with gRPC's codes: UNAVAILABLE
or CANCELLED when the replica is gone (the pool retries on another), DEADLINE_EXCEEDED when the
call's time ran out, anything else when the replica refused the call. A session channel that
cannot use its session sends its rows as bytes instead: logged once per channel, counted in
FALLBACKS by reason (the router's metrics export it), never silent.
"""
from __future__ import annotations

from collections import Counter
from typing import Protocol

import grpc
import torch

CHANNELS = ("grpc", "shm", "cuda_ipc", "handle")
FALLBACKS: Counter[str] = Counter()  # session calls sent as bytes, by reason


class Channel(Protocol):
    address: str
    wire_itemsize: int | None  # bytes per element on the wire when not the tensor's own

    async def forward(self, x_TH: torch.Tensor, segments, *, timeout: float,
                      out: torch.Tensor | None = None) -> torch.Tensor: ...

    async def close(self) -> None: ...


def error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A failure in gRPC's terms, for channels that are not gRPC calls themselves."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def deliver(y_TH: torch.Tensor, x_TH: torch.Tensor, out: torch.Tensor | None, staging, copy: bool) -> torch.Tensor:
    """y_TH on x_TH's device in its dtype: written into `out` when given, else a tensor (a copy
    when `copy`, as for a shared buffer that the next call reuses); host to GPU through `staging`'s
    pinned buffer."""
    if x_TH.is_cuda and not y_TH.is_cuda:
        y_TH = staging.to_device(y_TH, x_TH.device, x_TH.dtype)
    elif out is None:
        return y_TH.to(x_TH.device, x_TH.dtype, copy=copy)
    return y_TH if out is None else out.copy_(y_TH)
