"""The bytes channel: one grpc.aio channel to one expert replica; each call's rows go in a
ForwardFrame (moe_core/tensor_frame.py: a small protobuf header, then the raw rows, so the rows
are copied once on the way out and not at all on the way in). The way between nodes, and the
fallback of same-node sessions."""
from __future__ import annotations

import grpc
import torch

from moe.v1 import expert_pb2, expert_pb2_grpc
from moe_core import auth
from moe_core import tensor_frame
from moe_core.codec import DTYPES
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
        self._forward = self.channel.unary_unary(tensor_frame.METHOD)  # raw bytes both ways
        self.max_elements = dict(options).get("grpc.max_receive_message_length", MAX_MESSAGE_BYTES) // 2

    async def forward(self, x_TH: torch.Tensor, segments, *, timeout: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        data = tensor_frame.encode_request(self.staging.to_host(x_TH), segments, self.wire_dtype)
        reply = await self._forward(data, timeout=timeout, metadata=self.metadata)
        y_TH = tensor_frame.decode_reply(reply, rows=x_TH.shape[0], hidden=x_TH.shape[-1], max_elements=self.max_elements,
                                         dtype=DTYPES[self.wire_dtype] if self.wire_dtype else x_TH.dtype)
        return deliver(y_TH, x_TH, out, self.staging, copy=True)  # y_TH views the reply's bytes

    async def info(self, *, timeout: float) -> expert_pb2.InfoReply:
        return await self.stub.Info(expert_pb2.InfoRequest(), timeout=timeout, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
