"""The gateway on a real cluster, bounded before parsing: Serve's proxy takes no message past the
gateway's own limit (plain or inflated from gzip), reflection off by a flag, and a Generate client
that stops reading has its stream ended and its generation stopped."""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest
import ray
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe.v1 import gateway_pb2, gateway_pb2_grpc
from moe_core.codec import decode
from moe_serve import client
from moe_serve.launcher import load_config
from router_service.gateway import STREAM_IDLE_ENV
from router_service.gateway.grpc_ingress import REPLY_HEADER_BYTES
from router_service.sampling import SamplingParams
from tests.cluster_fixtures import running_app
from tests.conftest import run
from tests.reliability_helpers import call, experts, small_model, wait_until

TOKEN = "limits-token"
IDLE_S = 1.0
LIMIT = 256 << 10  # the app's max_request_bytes, and so Serve's proxy limit
SHARE = 4  # max_requests_per_client
EXHAUSTED, UNAUTHENTICATED = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model = small_model(tmp_path_factory.mktemp("small"))
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(TOKEN + "\n")
    saved = os.environ.get(STREAM_IDLE_ENV)
    os.environ[STREAM_IDLE_ENV] = str(IDLE_S)  # before ray.init: Serve's proxy inherits it
    try:
        with running_app(model, edit=experts(2), auth_token_file=str(tokens), reflection=False,
                         max_request_bytes=LIMIT, max_requests_per_client=SHARE) as (address, _):
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
    limit = LIMIT
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
def test_logits_longer_than_a_message_go_by_score_stream(app, tmp_path_factory):
    """With the proxy held to the request limit, Score refuses logits that would not fit one
    message, naming ScoreStream; ScoreStream sends the same logits in chunks, equal to in-process."""
    from router_service.engine import local_engine
    ids = [(7 * i) % 500 + 1 for i in range(300)]  # 300 x 512 float32: 600 KB, past the 256 KB limit
    metadata = [("authorization", f"Bearer {TOKEN}")]
    with grpc.insecure_channel(app) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        code, _, details = call(stub.Score, gateway_pb2.ScoreRequest(token_ids=ids), metadata=metadata, timeout=60)
        assert code == EXHAUSTED and "use ScoreStream" in details, details
        chunks = list(stub.ScoreStream(gateway_pb2.ScoreRequest(token_ids=ids), metadata=metadata, timeout=60))
        short = stub.Score(gateway_pb2.ScoreRequest(token_ids=ids[:100]), metadata=metadata, timeout=60)
    rows = (LIMIT - REPLY_HEADER_BYTES) // (4 * 512)  # float32 rows of the tiny vocabulary per message
    assert [c.first_row for c in chunks] == list(range(0, 300, rows)) and len(chunks) == 3
    streamed = np.concatenate([decode(c.logits).numpy() for c in chunks])
    model = small_model(tmp_path_factory.mktemp("again"))  # the same seed: the same weights
    want = run(local_engine(model).score(ids)).numpy()
    assert streamed.shape == (300, 512) and np.abs(streamed - want).max() <= 1e-5
    assert np.abs(decode(short.logits).numpy() - want[:100]).max() <= 1e-5


@pytest.mark.cluster
def test_a_client_past_its_share_of_requests_is_refused(app):
    """With max_requests_per_client, a caller holding its share of generations gets
    RESOURCE_EXHAUSTED for one more, and is served again once they have ended."""
    metadata = [("authorization", f"Bearer {TOKEN}")]
    request = client.request([5, 6, 7], None, SamplingParams(max_new_tokens=300))
    with grpc.insecure_channel(app) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        streams = [stub.Generate(request, metadata=metadata, timeout=120) for _ in range(SHARE)]
        firsts = [next(s) for s in streams]  # each admitted, and generating
        code, _, details = call(stub.Complete, client.request([5], None, SamplingParams(max_new_tokens=1)),
                                metadata=metadata, timeout=60)
        assert code == EXHAUSTED and "max_requests_per_client" in details, details
        lengths = [1 + sum(1 for _ in s) for s in streams]
        again = stub.Complete(client.request([5], None, SamplingParams(max_new_tokens=1)), metadata=metadata,
                              timeout=60)
    assert all(f.token_ids for f in firsts) and lengths == [300] * SHARE and len(again.token_ids) == 1


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
