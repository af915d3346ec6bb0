"""The Serve-handle channel: an expert call through the shard's deployment handle, Ray's own
transport and serialization (the Ray-native baseline the other channels are measured against).
Serve picks the replica; the pool still splits a hot shard's rows into one call per replica the
directory lists, and Serve spreads them."""
from __future__ import annotations

import asyncio

import grpc
import torch
from ray import exceptions as ray_errors
from ray.serve.exceptions import BackPressureError

from router_service.channels import error

_GONE = (ray_errors.RayActorError, ray_errors.ActorUnavailableError, BackPressureError)


class HandleChannel:
    wire_itemsize = None

    def __init__(self, address: str, handle):
        self.address, self.handle = address, handle

    async def forward(self, x_TH: torch.Tensor, segments, *, timeout: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        response = self.handle.forward.remote(x_TH.cpu(), [list(s) for s in segments])
        try:
            y_TH = await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise error(grpc.StatusCode.DEADLINE_EXCEEDED, "expert call through its Serve handle timed out") from None
        except _GONE as e:
            raise error(grpc.StatusCode.UNAVAILABLE, f"expert replica unavailable: {type(e).__name__}") from None
        except ray_errors.RayTaskError as e:  # refused (bad input: a ValueError) or failed on the replica
            bad = isinstance(e.cause, ValueError)
            raise error(grpc.StatusCode.INVALID_ARGUMENT if bad else grpc.StatusCode.INTERNAL,
                        str(e.cause) if bad else f"expert compute failed: {type(e.cause).__name__}") from None
        return y_TH.to(x_TH.device, x_TH.dtype) if out is None else out.copy_(y_TH)

    async def close(self) -> None:
        pass
