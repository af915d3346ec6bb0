"""ExpertService.ForwardFrame over real loopback gRPC: answers equal the protobuf Forward's, every
malformed frame is refused INVALID_ARGUMENT (a call without the key UNAUTHENTICATED) with a
message naming the problem, and random frames never break the server."""
import asyncio
import itertools
import re
import struct
import threading
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expert_service.experts import ExpertShard, expert_ffn
from expert_service.server import MAX_SEGMENTS, ExpertServicer, start_server
from moe.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from moe_core import auth, tensor_frame
from moe_core.checkpoint import Checkpoint, expert_keys, random_weights, write_checkpoint
from moe_core.codec import DTYPES, WireError, decode, encode
from moe_core.config import preset
from moe_core.grpc_options import CHANNEL_OPTIONS
from moe_core.tensor_frame import decode_reply, decode_request, encode_reply, encode_request
from router_service.channels.grpc_bytes import BytesChannel

CFG = preset("tiny")  # H=64, I=128
H = CFG.hidden_size
PAIRS = [(0, 0), (0, 1), (1, 7)]
MAX_ROWS = 64
U32 = 2**32 - 1
INVALID, UNAUTH = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on its own event loop thread; blocking raw-bytes callables with and without the key."""
    state = random_weights(CFG, seed=3)
    path = tmp_path_factory.mktemp("tiny")
    write_checkpoint(path, CFG, state)
    # Calls of 4+ rows compute on the worker thread, smaller ones inline: both paths get exercised.
    servicer = ExpertServicer(ExpertShard.load(Checkpoint(path), PAIRS), max_rows=MAX_ROWS,
                              inline_below=4 * H * CFG.intermediate_size)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(start_server(servicer), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    yield state, servicer, f"127.0.0.1:{port}", channel
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def reference(state, x_TH, segments):
    out, start = [torch.zeros(0, H)], 0
    for layer, expert, rows in segments:
        out.append(expert_ffn(x_TH[start:start + rows].float(), *(state[k] for k in expert_keys(layer, expert))))
        start += rows
    return torch.cat(out)


def frame_call(channel):
    return channel.unary_unary(tensor_frame.METHOD, request_serializer=None, response_deserializer=None)


LAYOUTS = [
    [(0, 0, 5)],
    [(0, 0, 3), (0, 1, 4), (1, 7, 1)],
    [(1, 7, 2), (0, 1, 0), (0, 0, 3)],  # not in order, an empty group
    [(0, 1, 40), (1, 7, 20)],  # on the worker thread
    [],  # nothing routed here this step
]


def test_frames_answer_what_forward_answers(served):
    state, servicer, addr, _ = served
    md = auth.call_metadata(servicer.key)
    cases = [(seg, dtype, wire) for seg in LAYOUTS for dtype, wire in
             ((torch.float32, None), (torch.bfloat16, None), (torch.float32, "bfloat16"), (torch.float32, "float16"))]

    async def main():
        async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            for segments, dtype, wire in cases:
                x = torch.randn(sum(n for *_, n in segments), H).to(dtype)
                async with BytesChannel(addr, wire_dtype=wire, key=servicer.key) as frames:
                    y = (await frames.forward(x, segments, timeout=10)).to(DTYPES[wire] if wire else dtype)
                request = expert_pb2.ForwardRequest(hidden=encode(x, wire), segments=[
                    expert_pb2.Segment(layer=L, expert=E, rows=n) for L, E, n in segments])
                want = decode((await stub.Forward(request, timeout=10, metadata=md)).output)
                assert y.dtype == want.dtype == (DTYPES[wire] if wire else dtype) and y.shape == x.shape
                assert torch.equal(y, want), (segments, dtype, wire)
                tol = 1e-5 if y.dtype == torch.float32 else 3e-2
                torch.testing.assert_close(y.float(), reference(state, x.to(y.dtype), segments), rtol=tol, atol=tol)

    calls = servicer.calls
    asyncio.run(main())
    assert servicer.calls == calls + 2 * len(cases) and servicer.in_flight == 0  # counted like Forward


def test_codec_round_trip_without_a_server():
    x = torch.randn(6, 2 * H)[:, ::2]  # not contiguous
    data = encode_request(x, [(0, 0, 6)], wire_dtype="bfloat16")
    (n,) = struct.unpack_from(">I", data)
    header = expert_pb2.ForwardRequest.FromString(data[4:4 + n])
    assert header.hidden.dtype == "bfloat16" and list(header.hidden.shape) == [6, H] and not header.hidden.data
    assert len(data) == 4 + n + 6 * H * 2
    y, segments = decode_request(data, hidden=H, max_elements=6 * H, max_segments=4)
    assert segments == [(0, 0, 6)] and torch.equal(y, x.to(torch.bfloat16))
    for k in range(40):  # whatever the header's length, the payload starts 16-byte aligned
        data = encode_request(torch.ones(1, H), [(0, k, 1)] + [(0, 0, 0)] * k)
        assert (4 + struct.unpack_from(">I", data)[0]) % 16 == 0
        assert decode_request(data, hidden=H, max_elements=H, max_segments=64)[0].data_ptr() % 16 == 0
    for t in (torch.randn(3, H), torch.randn(3, H).to(torch.bfloat16), torch.zeros(0, H)):
        back = decode_reply(encode_reply(t), rows=t.shape[0], hidden=H, max_elements=3 * H, dtype=t.dtype)
        assert back.dtype == t.dtype and torch.equal(back, t)


def reply_frame(dtype="float32", shape=(3, H), payload=None):
    header = expert_pb2.ForwardReply(output=common_pb2.Tensor(dtype=dtype, shape=shape)).SerializeToString()
    payload = bytes(4 * 3 * H) if payload is None else payload
    return struct.pack(">I", len(header)) + header + payload


@pytest.mark.parametrize("data, match", [
    (b"\x00\x00", "shorter than its 4-byte header length"),
    (struct.pack(">I", 5000) + bytes(5000), "header length 5000 exceeds the limit of 4096"),
    (struct.pack(">I", 10) + b"\x0a", "runs past the frame's 5 bytes"),
    (reply_frame(shape=(4, H)), "4 rows returned for 3"),
    (reply_frame(shape=(3, H + 1)), f"last dimension must be {H}"),
    (reply_frame(dtype="float16", payload=bytes(2 * 3 * H)), "dtype float16 returned for float32"),
    (reply_frame(dtype="int64"), "dtype 'int64' is not accepted"),
    (reply_frame(payload=bytes(4 * 3 * H + 1)), "data bytes do not match"),
    (reply_frame(shape=(3 * 10**9, H)), "4 rows|elements, limit is|rows returned"),
    (struct.pack(">I", 2) + b"\x0a\xff" + bytes(8), "not a valid moe.v1.ForwardReply|runs past its end|varint"),
])
def test_bad_replies_raise_wire_error(data, match):
    with pytest.raises(WireError, match=match):
        decode_reply(data, rows=3, hidden=H, max_elements=MAX_ROWS * H, dtype=torch.float32)


def frame(dtype="float32", shape=(4, H), payload=None, segments=((0, 0, 4),), fill=0.5, **fields):
    """A request frame from its parts; the payload defaults to `fill` in `dtype` (zeros of 4 bytes each
    under a foreign tag)."""
    if payload is None:
        n = 1
        for d in shape:
            n *= d
        payload = (bytes(encode(torch.full((n,), fill, dtype=DTYPES[dtype])).data) if dtype in DTYPES
                   else bytes(4 * n))
    header = expert_pb2.ForwardRequest(
        hidden=common_pb2.Tensor(dtype=dtype, shape=list(shape)), **fields,
        segments=[expert_pb2.Segment(layer=L, expert=E, rows=r) for L, E, r in segments]).SerializeToString()
    return struct.pack(">I", len(header)) + header + payload


def raw_frame(header: bytes, payload: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">I", len(header) if length is None else length) + header + payload


LIMIT = tensor_frame.header_limit(MAX_SEGMENTS)
BAD = [
    (b"", "frame of 0 bytes is shorter"),
    (b"\x00\x00\x01", "frame of 3 bytes is shorter"),
    (raw_frame(b"\x0a\x02", length=100), "header length 100 runs past the frame's 6 bytes"),
    (raw_frame(bytes(LIMIT + 1)), f"header length {LIMIT + 1} exceeds the limit of {LIMIT} bytes"),
    (raw_frame(b"\x0a\xff\xff"), "not a valid moe.v1.ForwardRequest protobuf"),
    (raw_frame(b"\x0a\x02\x0a\x00\xff"), "not a valid moe.v1.ForwardRequest protobuf"),
    (raw_frame(b""), "hidden tensor is missing"),
    (raw_frame(expert_pb2.ForwardRequest(hidden=common_pb2.Tensor(dtype="float32", shape=[1, H], data=bytes(4 * H)))
               .SerializeToString(), bytes(4 * H)), "must have empty data"),
    (frame(session="s"), "sessions take their Forwards over the replica's doorbell"),
    (frame(payload=bytes(4 * 4 * H - 1)), f"{4 * 4 * H - 1} data bytes do not match shape \\[4, {H}\\]"),
    (frame(payload=bytes(4 * 4 * H + 1)), f"{4 * 4 * H + 1} data bytes do not match"),
    (frame(payload=b""), "0 data bytes do not match"),
    (frame(dtype="float64"), "hidden: dtype 'float64' is not accepted"),
    (frame(dtype="int32"), "hidden: dtype 'int32' is not accepted"),
    (frame(dtype="pickle"), "dtype 'pickle' is not accepted"),
    (frame(shape=(4, H + 1)), f"last dimension must be {H}"),
    (frame(shape=(4 * H,)), "expected rank 2"),
    (frame(shape=(2, 2, H), segments=((0, 0, 2),)), "expected rank 2"),
    (frame(shape=(-4, H), payload=b""), "negative dimension"),
    (frame(shape=(MAX_ROWS + 1, H), payload=bytes(16), segments=((0, 0, MAX_ROWS + 1),)),
     f"declares {(MAX_ROWS + 1) * H} elements, limit is {MAX_ROWS * H}"),
    (frame(shape=(2**40, H), payload=bytes(16)), "elements, limit is"),
    (frame(segments=[(0, 0, 0)] * (MAX_SEGMENTS + 1)),
     f"{MAX_SEGMENTS + 1} segments exceed the limit of {MAX_SEGMENTS}"),
    (frame(segments=[(0, 0, 0)] * 5000), f"more than {MAX_SEGMENTS + 4} fields"),
    (frame(pad=bytes(16)), "field 15 of 16 bytes exceeds 15"),
    (frame(segments=((0, 0, 3),)), "segments cover 3 rows, hidden has 4"),
    (frame(segments=((0, 0, 2**32 - 1), (0, 1, 5))), "segments cover 4294967300 rows"),
    (frame(segments=((0, 2, 4),)), "does not serve layer 0 expert 2"),
    (frame(fill=float("nan")), f"hidden: {4 * H} of {4 * H} values are NaN or infinite"),
    (frame(fill=float("inf"), dtype="bfloat16"), "NaN or infinite"),
    (frame(fill=float("-inf"), dtype="float16"), "NaN or infinite"),
]


def test_bad_frames_are_invalid_argument_fast(served):
    _, servicer, _, channel = served
    call = frame_call(channel)
    md = auth.call_metadata(servicer.key)
    for data, match in BAD:
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            call(data, timeout=5, metadata=md)
        assert time.perf_counter() - t0 < 2, match
        assert err.value.code() == INVALID, (match, err.value.code(), err.value.details())
        assert re.search(match, err.value.details()), (match, err.value.details())
        assert "Traceback" not in err.value.details()
    refused = servicer.refused
    for metadata in (None, auth.call_metadata("0" * 64)):
        with pytest.raises(grpc.RpcError) as err:
            call(frame(), timeout=5, metadata=metadata)
        assert err.value.code() == UNAUTH and "data-plane credential" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # the key is checked before the frame is looked at
        call(b"", timeout=5)
    assert err.value.code() == UNAUTH
    assert servicer.refused == refused + 3
    reply = call(frame(), timeout=5, metadata=md)  # still serving
    y = decode_reply(reply, rows=4, hidden=H, max_elements=MAX_ROWS * H, dtype=torch.float32)
    assert y.shape == (4, H) and servicer.in_flight == 0


@st.composite
def frames(draw):
    """Near-valid frames: a header of random dtype, shape and segments (or random bytes), a length
    word that is right or not, a payload of the right size (random bits: NaN and inf turn up) or not."""
    if draw(st.integers(0, 4)):
        T = draw(st.integers(0, 6))
        shape = draw(st.one_of(st.just([T, H]), st.lists(st.one_of(
            st.integers(0, 6), st.sampled_from([H - 1, H, H + 1, MAX_ROWS + 1, 2**31, 2**62]),
            st.integers(-(2**63), 2**63 - 1)), max_size=3)))
        dtype = draw(st.one_of(st.sampled_from(sorted(DTYPES) + ["float64", "", "uint8"]), st.text(max_size=6)))
        rows = shape[0] if shape and 0 <= shape[0] <= MAX_ROWS else T
        cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=3)))
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [rows])]
        pairs = st.one_of(st.sampled_from(PAIRS), st.tuples(st.integers(0, U32), st.integers(0, U32)))
        segments = [(*draw(pairs), r) for r in sizes]
        if draw(st.booleans()) and segments:
            segments[-1] = (*segments[-1][:2], draw(st.one_of(st.integers(0, rows + 2), st.just(U32))))
        tensor = common_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.sampled_from([b"", b"\x00" * 4])))
        header = expert_pb2.ForwardRequest(segments=[expert_pb2.Segment(layer=L, expert=E, rows=r)
                                                     for L, E, r in segments])
        if draw(st.integers(0, 9)):
            header.hidden.CopyFrom(tensor)
        header = header.SerializeToString()
        n = 1
        for d in shape:
            n = n * d if n * d < 2**20 else -1
        itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 4
        size = n * itemsize if n >= 0 and all(d >= 0 for d in shape) and n <= 1024 else draw(st.integers(0, 64))
        size = max(0, size + draw(st.sampled_from([0, 0, 0, -1, 1, itemsize])))
        payload = draw(st.one_of(st.binary(min_size=size, max_size=size), st.just(bytes(size))))
    else:
        header, payload = draw(st.binary(max_size=64)), draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(header)), st.just(len(header)), st.integers(0, U32)))
    return struct.pack(">I", length) + header + payload


@st.composite
def valid_frames(draw):
    """Frames encode_request makes, some with one byte changed or cut short."""
    T = draw(st.integers(0, 6))
    cuts = sorted(draw(st.lists(st.integers(0, T), max_size=3)))
    segments = [(*draw(st.sampled_from(PAIRS)), b - a) for a, b in zip([0] + cuts, cuts + [T])]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(T, H, generator=g).to(DTYPES[draw(st.sampled_from(["float32", "bfloat16", "float16"]))])
    data = bytearray(encode_request(x, segments, draw(st.sampled_from([None, "bfloat16"]))))
    change = draw(st.sampled_from(["none", "none", "byte", "cut"]))
    if change == "byte":
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif change == "cut":
        del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


def test_fuzzed_frames_are_refused_cleanly_then_a_valid_one_answers(served):
    state, servicer, _, channel = served
    call = frame_call(channel)
    md = auth.call_metadata(servicer.key)
    outcomes = {}

    examples = itertools.count(1)

    @settings(max_examples=400, **SETTINGS)
    @given(st.one_of(frames(), frames(), valid_frames(), st.binary(max_size=100)))
    def fuzz(data):
        keyed = next(examples) % 20 != 0  # every 20th without the key (counted: Hypothesis's draws are not uniform)
        try:
            reply = call(data, timeout=10, metadata=md if keyed else None)
        except grpc.RpcError as e:
            assert e.code() in (INVALID, UNAUTH) and (e.code() == UNAUTH) == (not keyed), (e.code(), e.details())
            assert e.details() and "Traceback" not in e.details() and "Unexpected" not in e.details()
            outcomes[e.code().name] = outcomes.get(e.code().name, 0) + 1
            return
        outcomes["OK"] = outcomes.get("OK", 0) + 1
        x, segments = decode_request(data, hidden=H, max_elements=MAX_ROWS * H, max_segments=MAX_SEGMENTS)
        y = decode_reply(reply, rows=x.shape[0], hidden=H, max_elements=MAX_ROWS * H, dtype=x.dtype)
        want = reference(state, x, segments).to(x.dtype)
        finite = want.isfinite()  # finite random bits can still overflow the expert math
        tol = 1e-5 if x.dtype == torch.float32 else 3e-2
        torch.testing.assert_close(y[finite].float(), want[finite].float(), rtol=tol, atol=tol)

    fuzz()
    assert outcomes.get("INVALID_ARGUMENT", 0) >= 200 and outcomes.get("UNAUTHENTICATED", 0) >= 5, outcomes
    assert outcomes.get("OK", 0) >= 30, outcomes  # the accepted path got exercised too
    x = torch.randn(5, H)
    y = decode_reply(call(encode_request(x, [(1, 7, 2), (0, 0, 3)]), timeout=10, metadata=md),
                     rows=5, hidden=H, max_elements=MAX_ROWS * H, dtype=torch.float32)
    torch.testing.assert_close(y, reference(state, x, [(1, 7, 2), (0, 0, 3)]), rtol=1e-5, atol=1e-6)
    assert servicer.in_flight == 0


def test_mtls_role_is_checked_before_the_frame(tmp_path, served):
    """With mTLS, a certificate the CA signed for another role (the gateway's) is refused on
    ForwardFrame as on Forward; the router's certificate gets its answer."""
    from expert_service.deployment import server_credentials
    from router_service import security
    from tests.pki import CA

    state, servicer, _, _ = served
    ca = CA(tmp_path)
    (cert, key), router, gateway = (ca.issue("moe-expert", dns=["moe-expert"]), ca.issue("moe-router"),
                                    ca.issue("gateway"))
    tls = {"ca": ca.path, "cert": cert, "key": key, "client_cert": router[0], "client_key": router[1],
           "server_name": "moe-expert"}
    x = torch.randn(3, H)

    async def main():
        server, port = await start_server(servicer.shard, credentials=server_credentials(tls),
                                          client_role="moe-router")
        md = auth.call_metadata(servicer.key)
        try:
            results = []
            options = CHANNEL_OPTIONS + security.expert_channel_options(tls)
            for client_cert, client_key in (gateway, router):
                creds = security.expert_channel_credentials(tls | {"client_cert": client_cert,
                                                                   "client_key": client_key})
                async with BytesChannel(f"127.0.0.1:{port}", credentials=creds, options=options,
                                        key=servicer.key) as ch:
                    try:
                        results.append(await ch.forward(x, [(0, 1, 3)], timeout=10))
                    except grpc.aio.AioRpcError as e:
                        results.append(e)
            return results
        finally:
            await server.stop(None)

    refused, y = asyncio.run(main())
    assert refused.code() == UNAUTH and "'moe-router' certificate" in refused.details()
    torch.testing.assert_close(y, reference(state, x, [(0, 1, 3)]), rtol=1e-5, atol=1e-6)
