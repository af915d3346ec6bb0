"""ExpertClient: one grpc.aio channel to one expert replica; encode, call Forward, decode."""
from __future__ import annotations

import grpc
import torch

from expert_service.server import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES
from moe.v1 import expert_pb2, expert_pb2_grpc
from moe_core.codec import FLOAT_DTYPES, WireError, decode, encode


class ExpertClient:
    """Create inside the event loop that will use it (grpc.aio channels bind to their loop)."""

    def __init__(self, address: str, options=CHANNEL_OPTIONS,
                 credentials: grpc.ChannelCredentials | None = None):
        self.address = address
        self.channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
                        else grpc.aio.insecure_channel(address, options=options))
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self.max_elements = dict(options).get("grpc.max_receive_message_length", MAX_MESSAGE_BYTES) // 2

    async def forward(self, x_TH: torch.Tensor, segments, *, timeout: float,
                      wire_dtype: str | None = None) -> torch.Tensor:
        """Rows of x_TH by (layer, expert, rows) segments -> [T, H] unweighted expert outputs.

        `wire_dtype` (e.g. "bfloat16") halves the bytes of a float32 x_TH; the reply comes back
        in that dtype and is cast to x_TH's. Raises grpc.aio.AioRpcError on a failed call.
        """
        request = expert_pb2.ForwardRequest(
            hidden=encode(x_TH, wire_dtype),
            segments=[expert_pb2.Segment(layer=L, expert=E, rows=n) for L, E, n in segments])
        reply = await self.stub.Forward(request, timeout=timeout)
        y_TH = decode(reply.output, allowed_dtypes=FLOAT_DTYPES, max_elements=self.max_elements,
                      expect_rank=2, expect_last_dim=x_TH.shape[-1], name="output")
        if y_TH.shape[0] != x_TH.shape[0]:
            raise WireError(f"{self.address} returned {y_TH.shape[0]} rows for {x_TH.shape[0]}")
        return y_TH.to(x_TH.dtype)

    async def info(self, *, timeout: float) -> expert_pb2.InfoReply:
        return await self.stub.Info(expert_pb2.InfoRequest(), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
