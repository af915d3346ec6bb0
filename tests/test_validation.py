"""The gateway's request rules, status mapping and bearer-token checks, without a cluster."""
from __future__ import annotations

import grpc
import pytest
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from moe.v1 import gateway_pb2
from moe_core.config import preset
from router_service import security, validation
from router_service.engine import Overloaded
from router_service.gateway import RouterUnavailable, _status
from router_service.replica_pool import ExpertsUnavailable
from router_service.validation import RequestError

CFG = preset("tiny")  # vocab 512, context 512
INVALID, OUT_OF_RANGE, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                                    grpc.StatusCode.RESOURCE_EXHAUSTED)


def code_of(fn, *args):
    with pytest.raises(RequestError) as e:
        fn(*args)
    assert "Traceback" not in e.value.message
    return e.value.code, e.value.message


def sampling(**kw):
    return gateway_pb2.SamplingParams(**{"max_new_tokens": 4, **kw})


def test_parse_refuses_oversized_and_corrupt_bytes():
    good = gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2], sampling=sampling()).SerializeToString()
    assert validation.parse(good, gateway_pb2.GenerateRequest).prompt_token_ids == [1, 2]
    assert code_of(validation.parse, good, gateway_pb2.GenerateRequest, len(good) - 1)[0] == EXHAUSTED
    # a bad varint, a field cut short, invalid UTF-8 in a string, a group wire type
    for junk in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x02\xff\xfe", b"\x0b" * 3):
        code, msg = code_of(validation.parse, junk, gateway_pb2.GenerateRequest)
        assert code == INVALID and "moe.v1.GenerateRequest" in msg


@pytest.mark.parametrize("ids, code, words", [
    ([], INVALID, "empty"),
    ([1, -1], INVALID, "[1] = -1"),
    ([0, 511, 512], INVALID, "[2] = 512"),
    ([1] * 513, OUT_OF_RANGE, "513 tokens"),
])
def test_token_ids(ids, code, words):
    got, msg = code_of(validation.check_token_ids, ids, CFG, "prompt_token_ids")
    assert got == code and words in msg


def test_token_ids_at_the_limits_pass():
    assert validation.check_token_ids([0, 511] * 256, CFG, "x") == [0, 511] * 256


def test_a_huge_prompt_is_refused_by_its_length_before_its_values():
    req = gateway_pb2.GenerateRequest(prompt_token_ids=[-5] * 2_000_000, sampling=sampling())
    assert code_of(validation.prompt_ids, req, CFG, None)[0] == OUT_OF_RANGE


def test_prompt_sources():
    both = gateway_pb2.GenerateRequest(prompt_token_ids=[1], prompt="hi")
    assert code_of(validation.prompt_ids, both, CFG, None) == (INVALID, "give prompt_token_ids or prompt, not both")
    assert code_of(validation.prompt_ids, gateway_pb2.GenerateRequest(), CFG, None)[0] == INVALID
    assert "no tokenizer" in code_of(validation.prompt_ids, gateway_pb2.GenerateRequest(prompt="hi"), CFG, None)[1]
    huge = gateway_pb2.GenerateRequest(prompt="x" * (validation.MAX_PROMPT_CHARS + 1))
    assert code_of(validation.prompt_ids, huge, CFG, None)[0] == EXHAUSTED


@pytest.mark.parametrize("kw, prompt_len, code, words", [
    (dict(max_new_tokens=0), 1, INVALID, "max_new_tokens"),
    (dict(max_new_tokens=512), 1, OUT_OF_RANGE, "511 positions"),
    (dict(max_new_tokens=2**32 - 1), 1, OUT_OF_RANGE, "max_new_tokens"),
    (dict(temperature=float("nan")), 1, INVALID, "temperature"),
    (dict(temperature=float("inf")), 1, INVALID, "temperature"),
    (dict(temperature=-0.5), 1, INVALID, "temperature"),
    (dict(temperature=101.0), 1, INVALID, "temperature"),
    (dict(temperature=1e-6), 1, INVALID, "temperature"),  # logits / 1e-6 -> inf -> NaN probabilities
    (dict(top_p=float("nan")), 1, INVALID, "top_p"),
    (dict(top_p=-0.1), 1, INVALID, "top_p"),
    (dict(top_p=1.5), 1, INVALID, "top_p"),
    (dict(top_k=-1), 1, INVALID, "top_k"),
])
def test_sampling_rules(kw, prompt_len, code, words):
    got, msg = code_of(validation.sampling_params, sampling(**kw), prompt_len, CFG)
    assert got == code and words in msg


def test_sampling_at_the_limits_pass():
    p = validation.sampling_params(sampling(max_new_tokens=511, temperature=1e-4, top_p=0, top_k=10**9), 1, CFG)
    assert p.max_new_tokens == 511 and p.top_p == 1.0 and p.top_k == 10**9 and p.seed is None
    p = validation.sampling_params(sampling(temperature=100.0, top_p=1.0, seed=2**64 - 1), 1, CFG)
    assert p.temperature == 100.0 and p.seed == 2**64 - 1


def _ray_wrapped(cause):
    """What the gateway gets when the router raised `cause`: Ray's dual class, whose str() carries
    the remote traceback."""
    return RayTaskError("generate", "Traceback (most recent call last):\n  secret frame", cause).as_instanceof_cause()


@pytest.mark.parametrize("error, code, words", [
    (RequestError(INVALID, "bad field"), INVALID, "bad field"),
    (Overloaded("9 requests in flight"), EXHAUSTED, "9 requests in flight"),
    (BackPressureError(num_queued_requests=5, max_queued_requests=5), EXHAUSTED, "overloaded"),
    (TimeoutError("deadline exceeded"), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    (ExpertsUnavailable("no live replica of expert shard expert-1"), grpc.StatusCode.UNAVAILABLE, "expert-1"),
    (RouterUnavailable("router unavailable"), grpc.StatusCode.UNAVAILABLE, "router"),
    (ValueError("token id 9999 is out of range"), INVALID, "9999"),
    (KeyError("internal detail"), grpc.StatusCode.UNAVAILABLE, "retry"),
])
def test_status_mapping_hides_ray_tracebacks(error, code, words):
    for e in (error, _ray_wrapped(error)):
        got, msg = _status(e)
        assert got == code and words in msg
        assert "Traceback" not in msg and "secret" not in msg and "internal detail" not in msg
        assert got not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def test_dead_router_is_unavailable():
    assert _status(RayActorError())[0] == grpc.StatusCode.UNAVAILABLE


def test_bearer_tokens(tmp_path, monkeypatch):
    f = tmp_path / "tokens"
    f.write_text("# rotated weekly\nold-token\n\n  new-token  \n")
    tokens = security.load_tokens(str(f))
    assert tokens == [b"old-token", b"new-token"]
    assert security.check_bearer([("authorization", "Bearer new-token")], tokens) is None
    assert security.check_bearer([("x", "y"), ("Authorization", "bearer old-token")], tokens) is None
    assert "missing" in security.check_bearer([], tokens)
    assert "Bearer <token>" in security.check_bearer([("authorization", "Basic b2xkOnRva2Vu")], tokens)
    assert "Bearer <token>" in security.check_bearer([("authorization", "Bearer")], tokens)
    assert security.check_bearer([("authorization", "Bearer new-token-2")], tokens) == "invalid bearer token"
    assert security.check_bearer([], []) is None  # none configured: no authentication

    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        security.load_tokens(str(f))
    with pytest.raises(ValueError, match="cannot read"):
        security.load_tokens(str(tmp_path / "missing"))
    monkeypatch.setenv(security.TOKEN_ENV, "from-env")
    assert security.load_tokens() == [b"from-env"]
    monkeypatch.delenv(security.TOKEN_ENV)
    assert security.load_tokens() == []
