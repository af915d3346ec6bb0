"""The ExpertService gRPC server: decode one [T, H] hidden tensor and its (layer, expert, rows)
segments, run the shard's FFNs, encode the [T, H] output.

Every call is checked in this order, each step before any work of the next:
1. the data-plane key in its metadata (moe_core/auth.py), constant time, else
   UNAUTHENTICATED; with mTLS also the client certificate's role (`client_role`);
2. its size: the receive limit is the largest real call (`max_rows` rows of hidden float32 plus
   the segments), compressed messages are refused by gRPC itself (identity is the only algorithm
   enabled), and the wire form is walked before parsing so that neither segments past
   MAX_SEGMENTS nor a tensor header past its rank become objects (moe_core.codec.scan);
3. parsing (off the event loop for large messages), then the values.
Every malformed request ends as INVALID_ARGUMENT with a message naming the problem.

ForwardFrame is Forward with the tensor outside protobuf: raw bytes in and out, a small
ForwardRequest header and the rows' bytes after it (moe_core/tensor_frame.py). It takes the
same steps: the key first, then the header's length and wire form bounded before it is parsed,
the payload's length checked against the header exactly, and the rows viewed in the received
bytes, never copied or written.

Same-node sessions attach over the doorbell (expert_service/doorbell.py), one per connection,
and call through their ring (moe_core/ring.py), served on the ring's thread; gRPC Attach
and Detach are refused, so no buffer is ever opened by a name a client supplies.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expert_service.doorbell import DoorbellServer, Limits, Refused
from expert_service.experts import ExpertShard
from expert_service.ring_server import RingServer
from expert_service.session_graphs import SessionGraphs
from moe.v1 import common_pb2, expert_pb2
from moe_core import auth, ring, shared
from moe_core.codec import (FLOAT_DTYPES, TAGS, TENSOR_SCAN, WireError, check_finite, decode, encode,
                            keep_large_buffers, scan)
from moe_core.grpc_options import channel_options
from moe_core.staging import Staging
from moe_core.tensor_frame import decode_request, encode_reply, header_limit

log = logging.getLogger(__name__)

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
MAX_ROWS = 1 << 14  # rows per call: the engine's 8192-token step, top-2, all to one replica
MAX_SEGMENTS = ring.MAX_SEGMENTS  # a replica serves a few dozen (layer, expert) pairs; more is a broken client
MAX_SESSION_BYTES = 8 << 30  # shared buffers mapped at once, all sessions together
PARSE_INLINE_BYTES = 1 << 20  # larger requests are parsed on a worker thread
_HEADER_BYTES = header_limit(MAX_SEGMENTS)  # segments past MAX_SEGMENTS are refused before parsing


def message_limit(hidden_size: int, max_rows: int = MAX_ROWS) -> int:
    """The largest real ForwardRequest (and reply): max_rows rows of float32, plus the header."""
    return max_rows * hidden_size * 4 + _HEADER_BYTES




class ExpertServicer:
    """Serves one ExpertShard; computes in the shard's device and dtype.

    gRPC calls of at least `inline_below` rows*H*I multiply-adds compute on one worker thread (torch
    releases the GIL): the loop keeps receiving the next requests meanwhile, and `in_flight`
    then counts calls queued for that thread, the load signal for autoscaling. On a small CPU box,
    offloading bench-size calls was as fast or faster, and inline compute there sometimes stalled
    gRPC's own threads; for tiny calls the thread hop costs more than the matmuls, so those stay
    inline.
    """

    def __init__(self, shard: ExpertShard, *, max_message_bytes: int | None = None,
                 inline_below: int = 1 << 22, max_rows: int = MAX_ROWS, key: str | None = None,
                 client_role: str | None = None, limits: Limits = Limits(),
                 max_session_bytes: int = MAX_SESSION_BYTES, cuda_graphs: bool = True):
        if not shard.weights:
            raise ValueError("an expert server needs at least one (layer, expert) to serve")
        self.shard = shard
        w1_IH = next(iter(shard.weights.values()))[0]
        self.hidden_size = w1_IH.shape[1]
        self.dtype, self.device = w1_IH.dtype, w1_IH.device
        self.served = frozenset(shard.weights)
        self.max_rows = max_rows
        self.max_message_bytes = min(max_message_bytes or message_limit(self.hidden_size, max_rows),
                                     message_limit(self.hidden_size, max_rows))
        self.max_elements = max_rows * self.hidden_size
        # Read now: the key a deployment's replicas and routers derive alike (moe_core/auth.py).
        self.key = key or auth.data_key()
        self.client_role = client_role  # with mTLS: the role the client certificate must name
        self.limits, self.max_session_bytes = limits, max_session_bytes
        self.refused = 0  # calls refused UNAUTHENTICATED
        self.work_per_row = self.hidden_size * w1_IH.shape[0]  # H * I multiply-adds per matmul
        # On a GPU the kernels run asynchronously anyway; a worker thread only adds host<->device
        # copies from another thread, which were far slower than inline ones.
        self.inline_below = float("inf") if self.device.type == "cuda" else inline_below
        # OpenMP's thread count is per thread: the worker (and the ring's thread) take this
        # thread's, not one per core.
        self._pool_threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(1, "expert-compute", initializer=torch.set_num_threads,
                                        initargs=(self._pool_threads,))
        self.calls = self.rows = self.in_flight = 0
        # Load signals for autoscaling: rows inside Forward now, and seconds spent in Forward
        # summed over calls (its rate is the time-averaged number of calls in flight).
        self.rows_in_flight, self.busy_s = 0, 0.0
        self.sessions: dict[str, shared.Buffers] = {}  # same-node clients' shared buffers, by doorbell connection
        self.staging = Staging()  # pinned host buffer for GPU copies (used on the loop thread only)
        self.doorbell: DoorbellServer | None = None
        self.ring: RingServer | None = None  # serves the sessions' calls, on a thread of its own
        # Decode-size calls in place on a session's CUDA buffers replay a graph (on the ring's thread).
        self.graphs = SessionGraphs(shard) if cuda_graphs and self.device.type == "cuda" else None
        self._ring_staging = Staging()

    def _parse(self, request: expert_pb2.ForwardRequest) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        if len(request.segments) > MAX_SEGMENTS:
            raise WireError(f"{len(request.segments)} segments exceed the limit of {MAX_SEGMENTS}")
        segments = [(s.layer, s.expert, s.rows) for s in request.segments]
        if request.session:
            raise WireError("sessions take their Forwards over the replica's doorbell (Info.doorbell)")
        if not request.HasField("hidden"):
            raise WireError("hidden tensor is missing")
        else:
            x_TH = decode(request.hidden, allowed_dtypes=FLOAT_DTYPES, max_elements=self.max_elements,
                          expect_rank=2, expect_last_dim=self.hidden_size, name="hidden")
        return x_TH, self._check(segments, x_TH)

    def _check(self, segments, x_TH: torch.Tensor, finite: bool = True):
        for layer, expert, _ in segments:
            if (layer, expert) not in self.served:
                raise WireError(f"this replica does not serve layer {layer} expert {expert}")
        total = sum(rows for _, _, rows in segments)
        if total != x_TH.shape[0]:
            raise WireError(f"segments cover {total} rows, hidden has {x_TH.shape[0]}")
        # Rows from the wire or a /dev/shm file are checked. Rows in a CUDA IPC buffer are the
        # router's own GPU memory, like the in-process path's, and checking them would make this
        # host wait for the router's GPU work before launching anything.
        if finite and not x_TH.is_cuda:
            check_finite(x_TH, "hidden")
        return segments

    def _compute(self, x_TH: torch.Tensor, segments, pack=encode):
        """The [T, H] output in x_TH's dtype, on the host, packed for the reply by `pack` (a Tensor
        protobuf by default; ForwardFrame's packs a frame)."""
        y_TH = self.shard.forward(self.staging.to_device(x_TH, self.device, self.dtype), segments)
        return pack(self.staging.to_host(y_TH.to(x_TH.dtype)))

    def forward_session(self, session: str, rows: int, segments) -> None:
        """A call of a session's rows through its ring (on the ring's thread); raises WireError on
        bad input."""
        buffers = self.sessions.get(session)
        if buffers is None:
            raise WireError("the session is gone")
        if rows > buffers.capacity:
            raise WireError(f"rows {rows} exceed the session's {buffers.capacity}")
        if buffers.ready is not None:  # the client's rows are written once its event has fired
            torch.cuda.current_stream(buffers.x.device).wait_event(buffers.ready)
        x_TH = buffers.x[:rows]
        segments = self._check(segments, x_TH)
        with self._counted(x_TH):
            self._compute_session(x_TH, segments, buffers, session)

    def _compute_session(self, x_TH: torch.Tensor, segments, buffers: shared.Buffers, session: str) -> None:
        out = buffers.y[:x_TH.shape[0]]
        if buffers.peer:  # on another GPU: one copy over the link each way, the GEMMs read local memory
            out.copy_(self.shard.forward(x_TH.to(self.dtype, copy=True), segments))
        elif x_TH.device == self.device and x_TH.dtype == self.dtype:  # in place: buffers in, buffers out
            if self.graphs is None or not self.graphs.run(session, buffers.x, buffers.y, segments):
                self.shard.forward(x_TH, segments, out_TH=out)
        else:
            staging = self._ring_staging
            y_TH = self.shard.forward(staging.to_device(x_TH, self.device, self.dtype), segments)
            out.copy_(y_TH if out.is_cuda else staging.to_host(y_TH))
        if buffers.done is not None:  # the client's stream waits on it; nobody waits here
            buffers.done.record(torch.cuda.current_stream(out.device))

    async def forward_tensor(self, x_TH: torch.Tensor, segments) -> torch.Tensor:
        """A call from a Serve handle (rows as a tensor, not bytes), checked and counted like Forward."""
        if not (isinstance(x_TH, torch.Tensor) and x_TH.dim() == 2 and x_TH.shape[1] == self.hidden_size
                and x_TH.dtype in (torch.float32, torch.bfloat16, torch.float16) and x_TH.shape[0] <= self.max_rows):
            raise WireError(f"rows must be a float tensor [T <= {self.max_rows}, {self.hidden_size}]")
        if not all(isinstance(s, tuple) and len(s) == 3 and all(isinstance(v, int) for v in s) for s in segments) \
                or len(segments) > MAX_SEGMENTS:
            raise WireError(f"segments must be at most {MAX_SEGMENTS} (layer, expert, rows) integer triples")
        segments = self._check(segments, x_TH)
        with self._counted(x_TH):
            y_TH = self.shard.forward(x_TH.to(self.device, self.dtype), segments)
            return y_TH.to("cpu", x_TH.dtype)

    async def _run(self, x_TH: torch.Tensor, segments, pack=encode):
        """Computes one gRPC call, counting it; a fault of ours (e.g. device OOM) is logged and re-raised."""
        with self._counted(x_TH):
            if x_TH.shape[0] * self.work_per_row < self.inline_below:
                return self._compute(x_TH, segments, pack)
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._compute, x_TH, segments, pack)

    @contextlib.contextmanager
    def _counted(self, x_TH: torch.Tensor):
        self.in_flight += 1
        self.rows_in_flight += x_TH.shape[0]
        started = time.perf_counter()
        try:
            yield
            self.calls += 1
            self.rows += x_TH.shape[0]
        except Exception:
            log.exception("expert compute failed")
            raise
        finally:
            self.in_flight -= 1
            self.rows_in_flight -= x_TH.shape[0]
            self.busy_s += time.perf_counter() - started

    async def Forward(self, request, context):
        try:
            x_TH, segments = self._parse(request)
        except WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            output = await self._run(x_TH, segments)
        except Exception as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"expert compute failed: {type(e).__name__}")
        return expert_pb2.ForwardReply(output=output)

    async def ForwardFrame(self, data: bytes, context) -> bytes:
        """Forward over raw bytes frames (moe_core/tensor_frame.py): the rows are viewed in the
        received bytes, never written, and the reply is one frame in the request's dtype."""
        try:
            x_TH, segments = decode_request(data, hidden=self.hidden_size, max_elements=self.max_elements,
                                            max_segments=MAX_SEGMENTS)
            segments = self._check(segments, x_TH, finite=False)  # decode_request checked the rows
        except WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            return await self._run(x_TH, segments, encode_reply)
        except Exception as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"expert compute failed: {type(e).__name__}")

    async def Attach(self, request, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            "sessions attach over the replica's doorbell (Info.doorbell), with file descriptors")

    async def Detach(self, request, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            "a session is detached by closing its doorbell connection")

    def attach(self, request: dict, fds: list[int], pid: int) -> str:
        """A doorbell connection's Attach (its key already checked): maps the buffers it passed and
        starts serving its ring (the last three descriptors: control block, replica's eventfd,
        client's eventfd)."""
        if request["hidden"] != self.hidden_size:
            raise WireError(f"hidden_size {request['hidden']} != this replica's {self.hidden_size}")
        if request["dtype"] not in FLOAT_DTYPES:
            raise WireError(f"dtype {request['dtype']!r} is not a float wire dtype")
        dtype = shared.check_size(request["capacity"], request["hidden"], request["dtype"], self.max_rows)
        nbytes = 2 * request["capacity"] * request["hidden"] * dtype.itemsize
        mapped = sum(b.nbytes for b in self.sessions.values())
        if mapped + nbytes > self.max_session_bytes:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"shared buffers of {mapped} bytes mapped already (limit {self.max_session_bytes})")
        buffer_fds = 2 if request["kind"] == "shm" else 0
        if len(fds) != buffer_fds + 3:
            raise WireError(f"a {request['kind']} session passes {buffer_fds + 3} file descriptors "
                            f"({buffer_fds} buffers, the ring's control block and two eventfds), got {len(fds)}")
        control, wake, notify = fds[buffer_fds:]
        shared.check_fd(control, ring.CONTROL_BYTES)
        try:
            ring.check_eventfd(wake)
            ring.check_eventfd(notify)
        except (OSError, ValueError) as e:
            raise WireError(str(e)) from None
        buffers = shared.open_remote(request["kind"], request["capacity"], request["hidden"], request["dtype"],
                                     fds=fds[:buffer_fds], handles=request["handles"], events=request["events"],
                                     device=self.device, device_uuid=request["device_uuid"], max_rows=self.max_rows)
        session = uuid.uuid4().hex
        self.sessions[session] = buffers
        self.ring.add(session, control, wake, notify)
        return session

    def detach(self, session: str) -> None:
        if self.sessions.pop(session, None) is not None:
            self.ring.remove(session)

    async def start_doorbell(self) -> None:
        """Opens the Unix socket that same-node sessions attach through, and their ring's thread."""
        if self.doorbell is None:
            bell = DoorbellServer(self.attach, self.detach, self._last_call, self.key, self.limits)
            if await bell.start():
                self.ring = RingServer(self.forward_session, setup=self._ring_setup,
                                            closed=self.graphs.drop if self.graphs is not None else None)
                self.doorbell = bell

    def _last_call(self, session: str) -> float:
        return self.ring.last_call(session)

    def _ring_setup(self) -> None:
        """The ring thread takes the servicer's torch thread count (OpenMP's is per thread) and
        the replica's GPU."""
        torch.set_num_threads(self._pool_threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    async def Info(self, request, context):
        return expert_pb2.InfoReply(
            served=[common_pb2.ExpertKey(layer=L, expert=E) for L, E in sorted(self.served)],
            hidden_size=self.hidden_size, dtype=TAGS[self.dtype], device=str(self.device),
            calls=self.calls, rows=self.rows, in_flight=self.in_flight,
            doorbell=self.doorbell.path if self.doorbell else "")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.doorbell is not None:
            self.doorbell.close()
        if self.ring is not None:
            self.ring.stop()

    async def stop_doorbell(self) -> None:
        """Closes the doorbell and waits until its accept loop and connections have ended."""
        if self.doorbell is not None:
            await self.doorbell.stop()
        if self.ring is not None:
            self.ring.stop()


async def _authorize(servicer: ExpertServicer, context) -> None:
    """The data-plane key in the call's metadata and, with mTLS, the client certificate's role;
    else the call ends UNAUTHENTICATED."""
    try:
        auth.check_metadata(context.invocation_metadata(), servicer.key)
        if servicer.client_role:
            auth.check_peer_role(context.auth_context(), servicer.client_role)
    except auth.AuthError as e:
        servicer.refused += 1
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))


def _unary(servicer: ExpertServicer, method, request_cls, reply_cls, scan_limits: dict | None = None
           ) -> grpc.RpcMethodHandler:
    """Checks the caller, then the message's size and shape on the wire, then parses it. The
    generated registration would let gRPC parse first, and a corrupt protobuf would then end as
    UNKNOWN; here it is INVALID_ARGUMENT like every other bad input."""
    async def handler(data: bytes, context):
        await _authorize(servicer, context)
        try:
            if scan_limits:
                scan(data, name=request_cls.DESCRIPTOR.full_name, **scan_limits)
            if len(data) <= PARSE_INLINE_BYTES:
                request = request_cls.FromString(data)
            else:
                request = await asyncio.get_running_loop().run_in_executor(None, request_cls.FromString, data)
        except WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request is not a valid {request_cls.DESCRIPTOR.full_name} protobuf")
        return await method(request, context)
    return grpc.unary_unary_rpc_method_handler(handler, response_serializer=reply_cls.SerializeToString)


def _raw(servicer: ExpertServicer, method) -> grpc.RpcMethodHandler:
    """Checks the caller, then hands `method` the request's bytes as they arrived; its reply is
    bytes too (no serializer either way)."""
    async def handler(data: bytes, context):
        await _authorize(servicer, context)
        return await method(data, context)
    return grpc.unary_unary_rpc_method_handler(handler)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return channel_options(max_message_bytes) + [
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not silently share it
        # Only "identity": a compressed request is refused by gRPC before it is inflated.
        ("grpc.compression_enabled_algorithms_bitset", 1),
    ]


class ExpertServer:
    """The gRPC server of one ExpertServicer; `stop` also closes the servicer's doorbell. Everything
    else is the grpc.aio.Server's."""

    def __init__(self, server: grpc.aio.Server, servicer: ExpertServicer):
        self._server, self.servicer = server, servicer

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)
        await self.servicer.stop_doorbell()

    def __getattr__(self, name):
        return getattr(self._server, name)


async def start_server(shard: ExpertShard | ExpertServicer, *, host: str = "127.0.0.1", port: int = 0,
                       credentials: grpc.ServerCredentials | None = None,
                       client_role: str | None = None) -> tuple[ExpertServer, int]:
    """Starts ExpertService and grpc.health.v1 on host:port (0 picks a free port).

    Pass an ExpertServicer instead of a shard to keep a handle on its counters and set its limits.
    `client_role`, with mTLS credentials, is the name a client certificate must carry.
    """
    keep_large_buffers()
    servicer = shard if isinstance(shard, ExpertServicer) else ExpertServicer(shard)
    if client_role:
        servicer.client_role = client_role
    server = grpc.aio.server(options=server_options(servicer.max_message_bytes))
    forward_scan = {"max_fields": MAX_SEGMENTS + 3, "nested": {1: TENSOR_SCAN}}
    small = {"max_fields": 16, "max_len": {f: 4096 for f in range(1, 9)}}
    server.add_registered_method_handlers(SERVICE_NAME, {
        "Forward": _unary(servicer, servicer.Forward, expert_pb2.ForwardRequest, expert_pb2.ForwardReply,
                          forward_scan),
        "ForwardFrame": _raw(servicer, servicer.ForwardFrame),
        "Info": _unary(servicer, servicer.Info, expert_pb2.InfoRequest, expert_pb2.InfoReply, small),
        "Attach": _unary(servicer, servicer.Attach, expert_pb2.AttachRequest, expert_pb2.AttachReply, small),
        "Detach": _unary(servicer, servicer.Detach, expert_pb2.DetachRequest, expert_pb2.DetachReply, small)})
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials
                 else server.add_insecure_port(address))
    except RuntimeError as e:
        raise OSError(f"cannot bind ExpertService to {address}: {e}") from None
    if not bound:
        raise OSError(f"cannot bind ExpertService to {address}")
    await server.start()
    await servicer.start_doorbell()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ExpertServer(server, servicer), bound
