"""Generated malformed requests against the real gateway on a real cluster (Serve's gRPC proxy in
front): each gets INVALID_ARGUMENT, OUT_OF_RANGE or RESOURCE_EXHAUSTED with a clear message, never
INTERNAL or UNKNOWN or a trace, and the service answers correctly afterwards.

Each hypothesis example is a batch of requests sent at once, so the few hundred requests take
seconds. Together with tests/test_expert_fuzz.py this is well over a thousand malformed requests.
"""
from __future__ import annotations

import concurrent.futures as cf
import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe.v1 import gateway_pb2, gateway_pb2_grpc
from moe_core.config import MoEConfig
from moe_serve import client
from router_service import validation
from router_service.engine import local_engine
from router_service.sampling import SamplingParams
from tests.cluster_fixtures import running_app
from tests.conftest import run
from tests.reliability_helpers import NOT_ALLOWED, call, experts, small_model

pytestmark = pytest.mark.cluster

INVALID, OUT_OF_RANGE, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                                    grpc.StatusCode.RESOURCE_EXHAUSTED)
I32, U32 = 2**31 - 1, 2**32 - 1
BATCH = 8
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
sent = {"malformed": 0, "garbage": 0}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    model = small_model(tmp_path_factory.mktemp("small"))
    with running_app(model, edit=experts(2)) as (address, _):
        ch = client.channel(address, ca="", token="")
        with cf.ThreadPoolExecutor(BATCH) as pool:
            yield {"address": address, "channel": ch, "stub": gateway_pb2_grpc.GatewayStub(ch), "pool": pool,
                   "cfg": MoEConfig.from_dir(model), "model": model}
        ch.close()


def clean(details: str) -> bool:
    return bool(details) and "Traceback" not in details and 'File "' not in details and "ray::" not in details


# -- generated requests ----------------------------------------------------------------------------

VOCAB, CONTEXT = 512, 512  # the tiny preset the small model is built on
ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
bad_floats = st.sampled_from([math.nan, math.inf, -math.inf, -1e-3, -1.0, -3e38])


@st.composite
def malformed_generate(draw):
    """A valid request with one to three rule violations; returns it and the codes it may get."""
    prompt = draw(ids)
    sp = dict(max_new_tokens=draw(st.integers(1, 4)), temperature=draw(st.sampled_from([0.0, 0.7, 1.3])),
              top_p=draw(st.sampled_from([0.0, 0.5, 1.0])), top_k=draw(st.integers(0, 50)))
    text, codes = "", set()
    for kind in draw(st.lists(st.sampled_from(
            ["empty", "both", "negative id", "big id", "long prompt", "no new tokens", "past the context",
             "temperature", "top_p", "top_k"]), min_size=1, max_size=3)):
        if kind == "empty":
            prompt, text = [], ""
            codes.add(INVALID)
        elif kind == "both":
            prompt, text = prompt or [1], draw(st.text(min_size=1, max_size=20))
            codes.add(INVALID)
        elif kind in ("negative id", "big id"):
            bad = draw(st.integers(-I32 - 1, -1) if kind == "negative id" else st.integers(VOCAB, I32))
            prompt = prompt[:] or [1]
            prompt.insert(draw(st.integers(0, len(prompt))), bad)
            codes.add(INVALID)
        elif kind == "long prompt":
            prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=CONTEXT + 1, max_size=CONTEXT + 40))
            codes.add(OUT_OF_RANGE)
        elif kind == "no new tokens":
            sp["max_new_tokens"] = 0
            codes.add(INVALID)
        elif kind == "past the context":
            sp["max_new_tokens"] = draw(st.integers(max(1, CONTEXT - len(prompt) + 1), U32))
            codes.add(OUT_OF_RANGE)
        elif kind == "temperature":  # also positive but too small to divide logits by
            sp["temperature"] = draw(st.one_of(bad_floats, st.floats(100.5, 3e38), st.floats(1e-30, 9e-5)))
            codes.add(INVALID)
        elif kind == "top_p":
            sp["top_p"] = draw(st.one_of(bad_floats, st.floats(1.001, 3e38)))
            codes.add(INVALID)
        elif kind == "top_k":
            sp["top_k"] = draw(st.integers(-I32 - 1, -1))
            codes.add(INVALID)
    if draw(st.booleans()):
        sp["seed"] = draw(st.integers(0, 2**64 - 1))
    request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, prompt=text,
                                          sampling=gateway_pb2.SamplingParams(**sp))
    return request, codes


@st.composite
def malformed_score(draw):
    kind = draw(st.sampled_from(["empty", "bad id", "long"]))
    if kind == "empty":
        return gateway_pb2.ScoreRequest(token_ids=[]), {INVALID}
    if kind == "bad id":
        tokens = draw(ids)
        tokens.insert(draw(st.integers(0, len(tokens))),
                      draw(st.one_of(st.integers(-I32 - 1, -1), st.integers(VOCAB, I32))))
        return gateway_pb2.ScoreRequest(token_ids=tokens), {INVALID}
    tokens = draw(st.lists(st.integers(-5, VOCAB + 5), min_size=CONTEXT + 1, max_size=CONTEXT + 40))
    return gateway_pb2.ScoreRequest(token_ids=tokens), {OUT_OF_RANGE}


@st.composite
def garbage(draw):
    """Bytes for any method: random, or a valid request's bytes truncated or with bytes flipped."""
    method = draw(st.sampled_from(["Complete", "Generate", "Score"]))
    if draw(st.booleans()):
        data = draw(st.binary(min_size=1, max_size=200))
    else:
        good = gateway_pb2.GenerateRequest(prompt_token_ids=draw(ids), sampling=gateway_pb2.SamplingParams(
            max_new_tokens=2)).SerializeToString()
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = bytes(data[:draw(st.integers(1, len(data)))])
    return method, data


def _send(gateway, method, request):
    stub = gateway["stub"]
    if method == "Generate":
        return call(lambda r, timeout: list(stub.Generate(r, timeout=timeout)), request, timeout=60)
    return call(getattr(stub, method), request, timeout=60)


def _send_raw(gateway, method, data):
    fn = gateway["channel"].unary_stream if method == "Generate" else gateway["channel"].unary_unary
    f = fn(f"/moe.v1.Gateway/{method}")
    if method == "Generate":
        return call(lambda d, timeout: list(f(d, timeout=timeout)), data, timeout=60)
    return call(f, data, timeout=60)


def test_malformed_generate_requests(gateway):
    @settings(max_examples=36, **SETTINGS)
    @given(st.lists(st.tuples(st.sampled_from(["Complete", "Generate"]), malformed_generate()),
                    min_size=BATCH, max_size=BATCH))
    def batch(cases):
        results = list(gateway["pool"].map(lambda c: _send(gateway, c[0], c[1][0]), cases))
        sent["malformed"] += len(cases)
        for (method, (request, codes)), (code, _, details) in zip(cases, results):
            assert code in codes, (method, request, code, details)
            assert clean(details), details
    batch()


def test_malformed_score_requests(gateway):
    @settings(max_examples=10, **SETTINGS)
    @given(st.lists(malformed_score(), min_size=BATCH, max_size=BATCH))
    def batch(cases):
        results = list(gateway["pool"].map(lambda c: _send(gateway, "Score", c[0]), cases))
        sent["malformed"] += len(cases)
        for (request, codes), (code, _, details) in zip(cases, results):
            assert code in codes and clean(details), (code, details)
    batch()


def test_garbage_bytes(gateway):
    @settings(max_examples=12, **SETTINGS)
    @given(st.lists(garbage(), min_size=BATCH, max_size=BATCH))
    def batch(cases):
        results = list(gateway["pool"].map(lambda c: _send_raw(gateway, *c), cases))
        sent["garbage"] += len(cases)
        for (method, data), (code, _, details) in zip(cases, results):
            assert code not in NOT_ALLOWED, (method, data, code, details)
            # bytes that happen to parse as a valid request are served; everything else is refused
            if code != grpc.StatusCode.OK:
                assert code in (INVALID, OUT_OF_RANGE, EXHAUSTED) and clean(details), (code, details)
    batch()


def test_oversized_requests_and_metadata(gateway):
    stub, ok_request = gateway["stub"], client.request([1, 2], None, SamplingParams(max_new_tokens=2))
    cases = [
        # larger than the gateway takes: refused by Serve's proxy (its message limit is the gateway's) before
        # anything reads it
        (_send_raw, "Complete", b"\x0a" + b"\x80" * (validation.MAX_REQUEST_BYTES + 1), EXHAUSTED, "larger than max"),
        # a text prompt past the character limit
        (_send, "Complete", gateway_pb2.GenerateRequest(prompt="a" * (validation.MAX_PROMPT_CHARS + 1),
                                                        sampling=dict(max_new_tokens=1)), EXHAUSTED, "characters"),
        # a million prompt ids: refused by their count, quickly
        (_send, "Complete", gateway_pb2.GenerateRequest(prompt_token_ids=[1] * 1_000_000,
                                                        sampling=dict(max_new_tokens=1)), OUT_OF_RANGE, "context"),
        (_send, "Score", gateway_pb2.ScoreRequest(token_ids=[1] * 1_000_000), OUT_OF_RANGE, "context"),
    ]
    for send, method, request, code, words in cases:
        got, seconds, details = send(gateway, method, request)
        assert got == code and words in details and clean(details), (got, details)
        assert seconds < 30
    # metadata past gRPC's 16 KiB hard limit is refused by the proxy's gRPC server itself
    got, _, details = call(stub.Complete, ok_request, metadata=[("x-padding", "a" * 20_000)], timeout=30)
    assert got == EXHAUSTED and "metadata" in details
    sent["malformed"] += len(cases) + 1


def test_after_the_fuzz_the_service_answers_correctly(gateway):
    assert sent["malformed"] + sent["garbage"] >= 400, sent
    stub, engine = gateway["stub"], local_engine(gateway["model"])
    prompt, params = [5, 6, 7, 8], SamplingParams(max_new_tokens=6)
    want, reason = run(engine.complete(prompt, params))
    reply = stub.Complete(client.request(prompt, None, params), timeout=60)
    assert list(reply.token_ids) == want and reply.finish_reason == reason
    chunks = list(stub.Generate(client.request(prompt, None, params), timeout=60))
    assert [t for c in chunks for t in c.token_ids] == want
    logits = client.score(gateway["address"], prompt)
    assert np.abs(logits - run(engine.score(prompt)).numpy()).max() <= 1e-5
    assert client.healthy(gateway["address"], ca="", token="")
    stats = stub.Stats(gateway_pb2.StatsRequest(), timeout=30)
    assert stats.requests_running == 0 and stats.requests_queued == 0
