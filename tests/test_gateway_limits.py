"""The gateway on a real cluster, bounded before parsing: Serve's proxy takes no message past the
gateway's own limit (plain or inflated from gzip), reflection off by a flag, and a Generate client
that stops reading has its stream ended and its generation stopped."""
from __future__ import annotations

import os
import time

import grpc
import pytest
import ray
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe.v1 import gateway_pb2, gateway_pb2_grpc
from moe_serve import client
from router_service import validation
from router_service.gateway import STREAM_IDLE_ENV
from moe_serve.launcher import load_config
from router_service.sampling import SamplingParams
from tests.cluster_fixtures import running_app
from tests.reliability_helpers import call, experts, small_model, wait_until

TOKEN = "limits-token"
IDLE_S = 1.0
EXHAUSTED, UNAUTHENTICATED = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model = small_model(tmp_path_factory.mktemp("small"))
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(TOKEN + "\n")
    saved = os.environ.get(STREAM_IDLE_ENV)
    os.environ[STREAM_IDLE_ENV] = str(IDLE_S)  # before ray.init: Serve's proxy inherits it
    try:
        with running_app(model, edit=experts(2), auth_token_file=str(tokens), reflection=False) as (address, _):
            yield address
    finally:
        if saved is None:
            os.environ.pop(STREAM_IDLE_ENV, None)
        else:
            os.environ[STREAM_IDLE_ENV] = saved


def proxy_pid() -> int:
    (pid,) = [a["Pid"] for a in ray._private.state.actors().values()
              if a["ActorClassName"] == "ProxyActor" and a["State"] == "ALIVE"]
    return pid


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def complete(address, data: bytes, token: str = "", compression=None):
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as ch:
        method = ch.unary_unary("/moe.v1.Gateway/Complete", response_deserializer=gateway_pb2.GenerateReply.FromString)
        return call(method, data, metadata=metadata, timeout=60, compression=compression)


def test_reflection_flag_sets_serves_option(tiny_model):
    assert "enable_reflection" not in load_config(model=str(tiny_model))["grpc_options"]  # Serve's default: on
    assert load_config(model=str(tiny_model), reflection=False)["grpc_options"]["enable_reflection"] is False


@pytest.mark.cluster
def test_oversized_and_gzip_requests_without_a_token_are_refused_by_the_proxy(app):
    pid = proxy_pid()
    peak = peak_rss_mb(pid)
    limit = validation.MAX_REQUEST_BYTES  # the small model's full-context Score reply is below it
    # plain, one byte past the limit: the proxy's gRPC server refuses it, the gateway never sees it
    code, seconds, details = complete(app, b"\0" * (limit + 1))
    assert code == EXHAUSTED and f"larger than max ({limit + 1} vs. {limit})" in details, details
    assert seconds < 3
    # 64 MiB of zeros in gzip (about 64 KB on the wire): inflated no further than the limit
    for _ in range(4):
        code, seconds, details = complete(app, b"\0" * (64 << 20), compression=grpc.Compression.Gzip)
        assert code == EXHAUSTED and "Decompressed message larger than max" in details, details
        assert seconds < 3
    assert peak_rss_mb(pid) - peak < 100
    # within the limit, gzip or not: the gateway checks the token, then answers
    request = client.request([5, 6, 7], None, SamplingParams(max_new_tokens=2)).SerializeToString()
    for compression in (None, grpc.Compression.Gzip):
        code, _, details = complete(app, request, compression=compression)
        assert code == UNAUTHENTICATED and "missing credentials" in details
        code, _, reply = complete(app, request, token=TOKEN, compression=compression)
        assert code == grpc.StatusCode.OK and len(reply.token_ids) == 2


@pytest.mark.cluster
def test_reflection_is_off(app):
    with grpc.insecure_channel(app) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        code, _, _ = call(lambda r, timeout: list(stub.ServerReflectionInfo(iter([r]), timeout=timeout)),
                          reflection_pb2.ServerReflectionRequest(list_services=""), timeout=30)
    assert code == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.cluster
def test_a_stream_whose_client_stops_reading_is_ended(app):
    prompt, n = [5, 6, 7, 8], 400
    req = client.request(prompt, None, SamplingParams(max_new_tokens=n))
    metadata = [("authorization", f"Bearer {TOKEN}")]
    # A window of one byte and no growth: the gateway's next message waits until this client reads.
    options = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(app, options=options) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        # read steadily through the same one-byte window: every token, OK
        chunks = list(stub.Generate(req, metadata=metadata, timeout=120))
        assert len(chunks) == n and chunks[-1].finish_reason
        # read one chunk, then nothing for several idle timeouts
        stream = stub.Generate(req, metadata=metadata, timeout=120)
        got = [next(stream)]
        time.sleep(4 * IDLE_S)
        with pytest.raises(grpc.RpcError) as e:
            got.extend(stream)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "read nothing" in e.value.details()
    assert len(got) < 10  # what was in flight; the rest was dropped
    with grpc.insecure_channel(app) as ch:
        stats = gateway_pb2_grpc.GatewayStub(ch).Stats
        wait_until(lambda: stats(gateway_pb2.StatsRequest(), metadata=metadata, timeout=30).requests_running == 0,
                   60, "the router has no request running")
