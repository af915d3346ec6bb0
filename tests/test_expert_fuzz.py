"""Generated malformed ForwardRequests against a real ExpertService: every one is answered OK or
INVALID_ARGUMENT (never INTERNAL/UNKNOWN, never a trace), and the server still computes right after."""
import array
import asyncio
import math
import os
import select
import socket
import threading

import grpc
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expert_service import doorbell
from expert_service.experts import ExpertShard, expert_ffn
from expert_service.server import ExpertServicer, start_server
from moe.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from moe_core import auth, doorbell_wire, ring, shared
from moe_core.checkpoint import Checkpoint, expert_keys, random_weights, write_checkpoint
from moe_core.codec import DTYPES, FLOAT_DTYPES, decode, encode
from moe_core.config import preset
from moe_core.grpc_options import CHANNEL_OPTIONS

CFG = preset("tiny")
H = CFG.hidden_size
PAIRS = [(0, 0), (0, 1), (1, 7)]
U32 = 2**32 - 1
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
outcomes: dict[tuple[str, str], int] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on its own event loop thread, so hypothesis can drive it with a blocking stub."""
    state = random_weights(CFG, seed=2)
    path = tmp_path_factory.mktemp("tiny")
    write_checkpoint(path, CFG, state)
    # Requests of 4+ rows compute on the worker thread, smaller ones inline: both paths get fuzzed.
    servicer = ExpertServicer(ExpertShard.load(Checkpoint(path), PAIRS), inline_below=4 * H * CFG.intermediate_size)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(start_server(servicer), loop).result(30)
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS),
                                     auth.KeyInterceptor(servicer.key))
    yield state, servicer, channel
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


tags = st.one_of(st.sampled_from(sorted(DTYPES) + ["float64", "", "FLOAT32", "uint8", "bool"]),
                 st.text(max_size=10))
dims = st.one_of(st.integers(0, 6), st.sampled_from([H - 1, H, H + 1, 2**31, 2**62]),
                 st.integers(-(2**63), 2**63 - 1))
pairs = st.one_of(st.sampled_from(PAIRS + [(0, 2), (2, 0), (U32, U32)]),
                  st.tuples(st.integers(0, U32), st.integers(0, U32)))


@st.composite
def valid_requests(draw):
    T = draw(st.integers(0, 6))
    cuts = sorted(draw(st.lists(st.integers(0, T), max_size=3)))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(T, H, generator=g).to(DTYPES[draw(st.sampled_from(sorted(FLOAT_DTYPES)))])
    return expert_pb2.ForwardRequest(hidden=encode(x), segments=[
        expert_pb2.Segment(layer=L, expert=E, rows=r) for (L, E), r in zip(draw(st.lists(
            st.sampled_from(PAIRS), min_size=len(sizes), max_size=len(sizes))), sizes)])


@st.composite
def malformed_requests(draw):
    T = draw(st.integers(0, 6))
    dtype = draw(tags)
    shape = draw(st.one_of(st.just([T, H]), st.lists(dims, max_size=4)))
    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 4
    n = math.prod(shape) if all(d >= 0 for d in shape) and math.prod(shape) <= 4096 else None
    kind = draw(st.sampled_from(["finite", "raw", "off_by", "any"] if n is not None else ["any"]))
    if kind == "finite" and dtype in DTYPES:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        data = encode((torch.randn(n, generator=g) * 4).to(DTYPES[dtype])).data
    elif kind in ("finite", "raw"):  # random bits: NaN/inf patterns turn up often
        data = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    elif kind == "off_by":
        data = bytes(max(0, n * itemsize + draw(st.sampled_from([-itemsize, -1, 1, itemsize]))))
    else:
        data = draw(st.binary(max_size=300))
    if draw(st.booleans()):  # near-valid segments: served pairs covering the first dim, maybe nudged
        rows = shape[0] if shape and 0 <= shape[0] <= 64 else T
        cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=3)))
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [rows])]
        segments = [(*draw(st.sampled_from(PAIRS)), r) for r in sizes]
        if draw(st.booleans()) and segments:
            L, E, r = segments[-1]
            segments[-1] = (L, E, draw(st.one_of(st.integers(0, rows + 2), st.just(U32))))
    else:
        segments = draw(st.lists(st.tuples(pairs, st.integers(0, U32)).map(lambda p: (*p[0], p[1])), max_size=5))
    hidden = common_pb2.Tensor(dtype=dtype, shape=shape, data=data)
    request = expert_pb2.ForwardRequest(
        segments=[expert_pb2.Segment(layer=L, expert=E, rows=r) for L, E, r in segments])
    if draw(st.integers(0, 19)):  # 1 in 20 leaves hidden unset
        request.hidden.CopyFrom(hidden)
    return request


def reference(state, x_TH, segments):
    out, start = [torch.zeros(0, H)], 0
    for s in segments:
        out.append(expert_ffn(x_TH[start:start + s.rows].float(), *(state[k] for k in expert_keys(s.layer, s.expert))))
        start += s.rows
    return torch.cat(out)


def check(call, request, state, source: str):
    """OK or INVALID_ARGUMENT only; an accepted request was valid after all, so check its answer."""
    try:
        reply = call(request, timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details() and "Traceback" not in e.details() and "Unexpected" not in e.details()
        outcomes[source, "invalid"] = outcomes.get((source, "invalid"), 0) + 1
        return
    outcomes[source, "ok"] = outcomes.get((source, "ok"), 0) + 1
    if isinstance(request, bytes):
        request = expert_pb2.ForwardRequest.FromString(request)
    x, y = decode(request.hidden), decode(reply.output)
    assert y.dtype == x.dtype and y.shape == x.shape
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    want = reference(state, x, request.segments).to(x.dtype)
    # Random bits can be finite yet huge (1e20 in bfloat16): the expert math then overflows, on the
    # server as in the reference, and only the finite part of the answer can be compared.
    finite = want.isfinite()
    torch.testing.assert_close(y[finite].float(), want[finite].float(), rtol=tol, atol=tol)


def test_fuzzed_requests_are_refused_cleanly_then_valid_one_answers(served):
    state, servicer, channel = served
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    raw = channel.unary_unary("/moe.v1.ExpertService/Forward", request_serializer=bytes,
                              response_deserializer=expert_pb2.ForwardReply.FromString)
    outcomes.clear()

    @settings(max_examples=900, **SETTINGS)  # ~3/4 malformed, ~1/4 valid in between
    @given(st.one_of(malformed_requests(), malformed_requests(), malformed_requests(), valid_requests()))
    def structured(request):
        check(stub.Forward, request, state, "structured")

    @settings(max_examples=150, **SETTINGS)
    @given(st.binary(max_size=200))
    def garbage(data):  # bytes that may not even parse as a protobuf
        check(raw, data, state, "garbage")

    structured()
    garbage()
    assert outcomes.get(("structured", "invalid"), 0) >= 600, outcomes
    assert outcomes.get(("structured", "ok"), 0) >= 50, outcomes  # the accepted path got exercised too

    x = torch.randn(5, H)
    request = expert_pb2.ForwardRequest(hidden=encode(x), segments=[
        expert_pb2.Segment(layer=1, expert=7, rows=2), expert_pb2.Segment(layer=0, expert=0, rows=3)])
    y = decode(stub.Forward(request, timeout=10).output)
    torch.testing.assert_close(y, reference(state, x, request.segments), rtol=1e-5, atol=1e-6)
    assert servicer.in_flight == 0


def test_fuzzed_doorbell_frames_and_ring_envelopes_are_refused_cleanly_then_a_valid_call_answers(served):
    """A same-node session: random bytes, random msgpack and near-valid frames as a connection's
    first frame (the Attach) get INVALID_ARGUMENT (or UNAUTHENTICATED, or OK when valid) or a
    closed connection; random envelopes written into an attached session's ring get OK or
    INVALID_ARGUMENT; neither breaks the server, and a valid call answers after."""
    state, servicer, channel = served
    buffers = shared.create("shm", 8, H, torch.float32)
    buffers.x.copy_(torch.randn(8, H))
    control, control_fd = ring.Control.create()
    wake, notify = ring.eventfd(), ring.eventfd()
    fds = [*buffers.fds, control_fd, wake, notify]
    path = servicer.doorbell.path

    def read(s):
        head = s.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return None
        return msgpack.unpackb(s.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL))

    def first(frame: bytes):
        """[code, details] on a new connection, or None when the server closed it without one."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            socket.send_fds(s, [frame], fds)
            out = read(s)
            return out if out is None else out[:2]

    values = st.one_of(st.integers(-2, 2**33), st.text(max_size=8), st.none(), st.floats(), st.binary(max_size=8))
    near_attach = st.tuples(st.just("attach"), st.sampled_from([servicer.key, "", "0" * 64]),
                            st.sampled_from(["shm", "cuda_ipc", ""]), st.sampled_from(["float32", "int8"]),
                            st.integers(-1, 1 << 20), st.sampled_from([H, H + 1, 0]), st.just([]), st.just([]),
                            st.just("")).map(list)
    frames = st.one_of(
        st.binary(max_size=64).map(lambda b: len(b).to_bytes(4, "big") + b),   # not msgpack
        st.recursive(values, lambda c: st.lists(c, max_size=4), max_leaves=8).map(doorbell_wire.pack),
        near_attach.map(doorbell_wire.pack))
    seen = {}
    allowed = {0, grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.UNAUTHENTICATED.value[0]}

    @settings(max_examples=200, **SETTINGS)
    @given(frames)
    def fuzz_attach(frame):
        out = first(frame)
        kind = "closed" if out is None else out[0]
        seen[kind] = seen.get(kind, 0) + 1
        if out is not None:
            code, details = out
            assert code in allowed, out
            assert code == 0 or (details and "Traceback" not in details)

    with socket.socket(socket.AF_UNIX) as s:  # one attached session whose ring gets the envelopes
        s.settimeout(10)
        s.connect(path)
        socket.send_fds(s, [doorbell_wire.pack(["attach", servicer.key, "shm", "float32", 8, H, [], [], ""])], fds)
        assert read(s)[0] == 0
        w, seq, ring_codes = control.words, [0], {}

        def call(rows, flat, nseg=None) -> tuple[int, str]:
            seq[0] += 1
            w[ring.ROWS], w[ring.NSEG] = rows, len(flat) // 3 if nseg is None else nseg
            w[ring.SEG:ring.SEG + len(flat)] = array.array("q", flat)
            w[ring.REQ] = seq[0]
            ring.ring(wake)
            for _ in range(10_000):
                if w[ring.RESP] == seq[0]:
                    return w[ring.CODE], control.details()
                select.select([notify], [], [], 0.01)
                ring.drain(notify)
            raise AssertionError("no answer from the ring")

        word = st.one_of(st.sampled_from([0, 1, 7, 2, 3, 8]), st.integers(-(2**63), 2**63 - 1))

        @settings(max_examples=200, **SETTINGS)
        @given(word, st.lists(word, max_size=12), st.one_of(st.none(), word))
        def fuzz_ring(rows, flat, nseg):
            code, details = call(rows, flat, nseg)
            ring_codes[code] = ring_codes.get(code, 0) + 1
            assert code in {0, grpc.StatusCode.INVALID_ARGUMENT.value[0]}, (code, details)
            assert code == 0 or (details and "Traceback" not in details)

        try:
            fuzz_attach()
            assert seen.get(grpc.StatusCode.INVALID_ARGUMENT.value[0], 0) >= 50, seen
            fuzz_ring()
            assert ring_codes.get(grpc.StatusCode.INVALID_ARGUMENT.value[0], 0) >= 100, ring_codes
            assert call(3, [1, 7, 3]) == (0, "")
            want = reference(state, buffers.x[:3], [expert_pb2.Segment(layer=1, expert=7, rows=3)])
            torch.testing.assert_close(buffers.y[:3], want, rtol=1e-5, atol=1e-6)
        finally:
            buffers.close_fds()
            for fd in (control_fd, wake, notify):
                os.close(fd)
