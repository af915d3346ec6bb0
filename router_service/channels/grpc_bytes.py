"""The bytes channel: one grpc.aio channel to one expert replica; encode, call Forward, decode.
The way between nodes, and the fallback of same-node sessions."""
from __future__ import annotations

import grpc
import torch

from moe.v1 import expert_pb2, expert_pb2_grpc
from moe_core import auth
from moe_core.codec import DTYPES, FLOAT_DTYPES, WireError, decode, encode
from moe_core.grpc_options import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES
from moe_core.staging import Staging
from router_service.channels import deliver

# A replica whose process dies closes its sockets and calls fail at once; one whose node vanishes
# (or that stops reading) would hold a call until its deadline. These bound that: a connection
# attempt gives up after 2 s (gRPC's default is 20 s), and a connection with calls in flight that
# stops answering keepalive pings is closed after 10 + 5 s; either way the call fails UNAVAILABLE
# and is retried on another replica. Pings go only while calls are in flight and at most two
# without data, within what servers accept by default.
EXPERT_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
]


class BytesChannel:
    """Create inside the event loop that will use it (grpc.aio channels bind to their loop).

    `wire_dtype` (e.g. "bfloat16") halves the bytes of float32 rows; the reply comes back in that
    dtype and is cast to the rows'. Every call carries the data-plane key (`key`, default
    moe_core.auth.data_key())."""

    def __init__(self, address: str, *, options=CHANNEL_OPTIONS, credentials: grpc.ChannelCredentials | None = None,
                 key: str | None = None, wire_dtype: str | None = None):
        self.address, self.wire_dtype = address, wire_dtype
        self.wire_itemsize = DTYPES[wire_dtype].itemsize if wire_dtype else None
        self.key = key or auth.data_key()
        self.metadata = auth.call_metadata(self.key)
        self.staging = Staging()  # pinned host buffer when the rows live on a GPU
        self.channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
                        else grpc.aio.insecure_channel(address, options=options))
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self.max_elements = dict(options).get("grpc.max_receive_message_length", MAX_MESSAGE_BYTES) // 2

    async def forward(self, x_TH: torch.Tensor, segments, *, timeout: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        request = expert_pb2.ForwardRequest(
            hidden=encode(self.staging.to_host(x_TH), self.wire_dtype),
            segments=[expert_pb2.Segment(layer=L, expert=E, rows=n) for L, E, n in segments])
        reply = await self.stub.Forward(request, timeout=timeout, metadata=self.metadata)
        y_TH = decode(reply.output, allowed_dtypes=FLOAT_DTYPES, max_elements=self.max_elements,
                      expect_rank=2, expect_last_dim=x_TH.shape[-1], name="output")
        if y_TH.shape[0] != x_TH.shape[0]:
            raise WireError(f"{self.address} returned {y_TH.shape[0]} rows for {x_TH.shape[0]}")
        return deliver(y_TH, x_TH, out, self.staging, copy=False)  # decoded into a tensor of its own

    async def info(self, *, timeout: float) -> expert_pb2.InfoReply:
        return await self.stub.Info(expert_pb2.InfoRequest(), timeout=timeout, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
