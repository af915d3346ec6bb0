"""ForwardFrame's wire form: an expert call's tensor outside protobuf, in one raw bytes frame.

    [4 bytes: header length N, big-endian][N bytes: header][payload: the tensor's raw bytes]

The header is a serialized ForwardRequest (reply: ForwardReply) whose Tensor carries dtype and
shape but no data, padded (its `pad` field) so that the payload starts 16-byte aligned; the
payload is that tensor, row-major, little-endian. gRPC moves the frame as
plain bytes (no serializer either side), so the payload is copied once on encode (header and
payload joined into the one bytes object gRPC sends) and not at all on decode (the tensor views
the received bytes). Protobuf would copy it into its arena, out again on serialize, and again on
parse.

A receiver checks everything the frame declares before it allocates anything: header length,
the header's wire form (segment count) and parse, dtype, rank, last dimension, element count,
payload length exactly; the request's rows must also be finite.
"""
from __future__ import annotations

import struct

import torch
from google.protobuf.message import DecodeError

from moe.v1 import common_pb2, expert_pb2
from moe_core.codec import (FLOAT_DTYPES, TAGS, TENSOR_SCAN, WireError, check_finite, check_header,
                            scan, view_payload, wire_form)

METHOD = "/moe.v1.ExpertService/ForwardFrame"
_LEN = struct.Struct(">I")
REPLY_HEADER_BYTES = 4096  # a ForwardReply header is a dtype tag and two dimensions
# Senders start the payload at a multiple of ALIGN bytes into the frame: a Python bytes object
# holds its data 16-byte aligned (as a protobuf Tensor's data is), and torch's CPU GEMMs compute
# other bits on less aligned input.
ALIGN = 16
_PAD_TAG = 15 << 3 | 2  # ForwardRequest.pad / ForwardReply.pad, length-delimited
_PAD_SCAN = {15: ALIGN - 1}  # the longest pad a sender writes


def header_limit(max_segments: int) -> int:
    """The largest request header: a segment takes at most 17 bytes (tag, length, three 5-byte
    varints), the tensor's dtype and shape fit in the slack."""
    return max_segments * 17 + 4096


def _payload(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat view, copied only when t is not already on the host and contiguous."""
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # bytes of any dtype, bfloat16 too


def _pad(n: int) -> bytes:
    """A `pad` field (15, bytes) that takes a header of n bytes to one where 4 + n is a multiple of
    ALIGN; empty when it already is. The field takes 2 bytes at least."""
    short = -(_LEN.size + n) % ALIGN
    if short == 0:
        return b""
    size = short if short >= 2 else short + ALIGN
    return bytes([_PAD_TAG, size - 2]) + bytes(size - 2)


def _frame(header: bytes, t: torch.Tensor) -> bytes:
    header += _pad(len(header))
    return b"".join([_LEN.pack(len(header)), header, _payload(t)])  # the payload's one copy


def _split(data, limit: int, name: str) -> tuple[memoryview, memoryview]:
    view = memoryview(data)
    if len(view) < _LEN.size:
        raise WireError(f"{name} frame of {len(view)} bytes is shorter than its {_LEN.size}-byte header length")
    n = _LEN.unpack_from(view)[0]
    if n > limit:
        raise WireError(f"{name} frame: header length {n} exceeds the limit of {limit} bytes")
    if _LEN.size + n > len(view):
        raise WireError(f"{name} frame: header length {n} runs past the frame's {len(view)} bytes")
    return view[_LEN.size:_LEN.size + n], view[_LEN.size + n:]


def _parse(cls, header: memoryview, scan_limits: dict):
    name = cls.DESCRIPTOR.full_name
    scan(header, name=name, **scan_limits)
    try:
        return cls.FromString(header)
    except DecodeError:
        raise WireError(f"frame header is not a valid {name} protobuf") from None


def encode_request(x_TH: torch.Tensor, segments, wire_dtype: str | None = None) -> bytes:
    """A ForwardFrame request: rows of x_TH by (layer, expert, rows) segments. `wire_dtype` (e.g.
    "bfloat16") casts the rows for the wire, as moe_core.codec.encode does; the reply comes back
    in that dtype. The rows' bytes are copied once, into the frame, when x_TH is a contiguous host
    tensor; stage a CUDA tensor through pinned memory first (moe_core.staging)."""
    x_TH, tag = wire_form(x_TH, wire_dtype)
    header = expert_pb2.ForwardRequest(
        hidden=common_pb2.Tensor(dtype=tag, shape=x_TH.shape),
        segments=[expert_pb2.Segment(layer=L, expert=E, rows=n) for L, E, n in segments]).SerializeToString()
    return _frame(header, x_TH)


def decode_request(data, *, hidden: int, max_elements: int, max_segments: int,
                   allowed_dtypes=FLOAT_DTYPES) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """A ForwardFrame request -> (x_TH, [(layer, expert, rows)]), or WireError naming the problem.

    x_TH views `data` without a copy: with bytes it is backed by read-only memory, so callers read
    it and never write into it (`.clone()` first to write). Whether the segments are served and
    cover x_TH's rows is the server's to check.
    """
    header, payload = _split(data, header_limit(max_segments), "request")
    request = _parse(expert_pb2.ForwardRequest, header, {"max_fields": max_segments + 4, "max_len": _PAD_SCAN,
                                                        "nested": {1: TENSOR_SCAN}})
    if request.session:
        raise WireError("sessions take their Forwards over the replica's doorbell (Info.doorbell)")
    if not request.HasField("hidden"):
        raise WireError("hidden tensor is missing from the frame header")
    if request.hidden.data:
        raise WireError("hidden: the frame header's tensor must have empty data; its bytes follow the header")
    if len(request.segments) > max_segments:
        raise WireError(f"{len(request.segments)} segments exceed the limit of {max_segments}")
    shape, dtype = check_header(request.hidden, allowed_dtypes=allowed_dtypes, max_elements=max_elements,
                                expect_rank=2, expect_last_dim=hidden, name="hidden")
    x_TH = view_payload(payload, shape, dtype, name="hidden")
    check_finite(x_TH, "hidden")
    return x_TH, [(s.layer, s.expert, s.rows) for s in request.segments]


def encode_reply(y_TH: torch.Tensor) -> bytes:
    """A ForwardFrame reply carrying y_TH as it is (its dtype is the wire's)."""
    y_TH, tag = wire_form(y_TH, None)
    header = expert_pb2.ForwardReply(output=common_pb2.Tensor(dtype=tag, shape=y_TH.shape)).SerializeToString()
    return _frame(header, y_TH)


def decode_reply(data, *, rows: int, hidden: int, max_elements: int, dtype: torch.dtype | None = None,
                 allowed_dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """A ForwardFrame reply -> y_TH [rows, hidden] (in `dtype` when given), or WireError. y_TH views
    `data` without a copy: read it, or copy it out; do not write into it."""
    header, payload = _split(data, REPLY_HEADER_BYTES, "reply")
    reply = _parse(expert_pb2.ForwardReply, header, {"max_fields": 2, "max_len": _PAD_SCAN,
                                                    "nested": {1: TENSOR_SCAN}})
    if not reply.HasField("output"):
        raise WireError("output tensor is missing from the frame header")
    if reply.output.data:
        raise WireError("output: the frame header's tensor must have empty data; its bytes follow the header")
    shape, got = check_header(reply.output, allowed_dtypes=allowed_dtypes, max_elements=max_elements,
                              expect_rank=2, expect_last_dim=hidden, name="output")
    if shape[0] != rows:
        raise WireError(f"output: {shape[0]} rows returned for {rows}")
    if dtype is not None and got != dtype:
        raise WireError(f"output: dtype {TAGS[got]} returned for {TAGS[dtype]}")
    return view_payload(payload, shape, got, name="output")
