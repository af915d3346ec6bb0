"""The OpenAI HTTP front on a real cluster, called with OpenAI's own client on 127.0.0.1: completions
from text and token ids equal the gRPC gateway's Complete, chat through the checkpoint's template,
streams, stop strings, every error in OpenAI's shape, a fuzz pass with no 5xx; the last test takes
the router away (503)."""
from __future__ import annotations

import http.client
import json

import grpc
import urllib.error
import urllib.request
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from ray import serve

from moe.v1 import gateway_pb2, gateway_pb2_grpc
from moe_core.tokenizer import load_tokenizer
from moe_serve import client
from router_service.sampling import SamplingParams
from tests.cluster_fixtures import free_port, running_app
from tests.reliability_helpers import experts, small_model, wait_until

pytestmark = pytest.mark.cluster

TOKEN = "http-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One request at a time (max_running 1, max_queued 0), so a second is over the limits."""
    model = small_model(tmp_path_factory.mktemp("small"))
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(TOKEN + "\n")
    port = free_port()
    with running_app(model, edit=experts(2), http_port=port, auth_token_file=str(tokens),
                     max_running=1, max_queued=0) as (address, cfg):
        yield {"grpc": address, "http": f"http://127.0.0.1:{port}", "model": model, "cfg": cfg,
               "openai": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0,
                                       timeout=120)}


def grpc_complete(app, **request) -> gateway_pb2.GenerateReply:
    with grpc.insecure_channel(app["grpc"]) as ch:
        return gateway_pb2_grpc.GatewayStub(ch).Complete(gateway_pb2.GenerateRequest(**request), metadata=AUTH,
                                                         timeout=120)


def sampling(n, **kw):
    return gateway_pb2.SamplingParams(max_new_tokens=n, **kw)


def post(app, path: str, raw: bytes | str, method: str = "POST", token: str | None = TOKEN) -> tuple[int, str, str]:
    """(status, content type, body) of a raw request, with the token unless it is None."""
    data = raw.encode() if isinstance(raw, str) else raw
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(f"{app['http']}/v1/{path}", data=data if method == "POST" else None, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


def running(app) -> int:
    return client.stats(app["grpc"], token=TOKEN).requests_running


def test_models_names_the_checkpoint(app):
    assert [m.id for m in app["openai"].models.list()] == [app["model"].name]
    assert app["openai"].models.retrieve(app["model"].name).id == app["model"].name


def test_greedy_completions_equal_grpc_complete(app):
    oa = app["openai"]
    for prompt, grpc_prompt in (([5, 6, 7, 8], dict(prompt_token_ids=[5, 6, 7, 8])),
                                ("Hello, world!", dict(prompt="Hello, world!"))):
        want = grpc_complete(app, **grpc_prompt, sampling=sampling(12))
        got = oa.completions.create(model=app["model"].name, prompt=prompt, max_tokens=12, temperature=0)
        [choice] = got.choices
        assert choice.token_ids == list(want.token_ids) and choice.text == want.text
        assert choice.finish_reason == want.finish_reason == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 12)
        assert got.usage.total_tokens == want.prompt_tokens + 12 and got.model == app["model"].name


def test_seeded_sampling_equals_grpc_and_repeats(app):
    want = grpc_complete(app, prompt_token_ids=[9, 10], sampling=sampling(10, temperature=0.8, top_p=0.9, seed=7))
    for _ in range(2):
        got = app["openai"].completions.create(model=app["model"].name, prompt=[9, 10], max_tokens=10,
                                               temperature=0.8, top_p=0.9, seed=7)
        assert got.choices[0].token_ids == list(want.token_ids)


def test_streamed_completion_is_the_unstreamed_one(app):
    oa, name = app["openai"], app["model"].name
    whole = oa.completions.create(model=name, prompt="The quick", max_tokens=20, temperature=0)
    chunks = list(oa.completions.create(model=name, prompt="The quick", max_tokens=20, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [t for c in chunks if c.choices for t in c.choices[0].token_ids] == whole.choices[0].token_ids
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and not any(reasons[:-1]) and len(reasons) == 20
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    # on the wire: server-sent events ending in [DONE]
    status, kind, text = post(app, "completions", '{"prompt": [5, 6], "max_tokens": 3, "temperature": 0, "stream": true}')
    assert status == 200 and kind.startswith("text/event-stream") and text.endswith("\n\n")
    events = [line for line in text.split("\n") if line]
    assert events[-1] == "data: [DONE]" and len(events) == 4 and all(e.startswith("data: ") for e in events)


def test_stop_strings_end_the_completion(app):
    oa, name = app["openai"], app["model"].name
    text = oa.completions.create(model=name, prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = text[8:11]
    assert len(stop) == 3 and stop.strip(), text
    cut = text[:text.find(stop)]
    got = oa.completions.create(model=name, prompt="Hello", max_tokens=30, temperature=0, stop=[stop, "\x00"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 30
    streamed = list(oa.completions.create(model=name, prompt="Hello", max_tokens=30, temperature=0, stop=stop,
                                          stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"


def test_chat_goes_through_the_checkpoints_template(app):
    from transformers import AutoTokenizer
    oa, name = app["openai"], app["model"].name
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    ids = AutoTokenizer.from_pretrained(app["model"]).apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=True, return_dict=False)
    want = grpc_complete(app, prompt_token_ids=ids, sampling=sampling(10))
    got = oa.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and got.choices[0].token_ids == list(want.token_ids)
    assert got.usage.prompt_tokens == len(ids)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             messages[1]]
    same = oa.chat.completions.create(model=name, messages=parts, max_completion_tokens=10, temperature=0)
    assert same.choices[0].message.content == want.text

    chunks = list(oa.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0,
                                             stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def openai_error(fn, **kw) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        fn(**kw)
    body = e.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return e.value.status_code, body["error"]


@pytest.mark.parametrize("kw, param, words", [
    (dict(prompt=""), "prompt", "empty"),
    (dict(prompt=[]), "prompt", "empty"),
    (dict(prompt=[1, 512]), "prompt", "[1] = 512 is out of range"),
    (dict(prompt=[1] * 600), "prompt", "600 tokens"),
    (dict(prompt=[1], max_tokens=0), "max_tokens", "at least 1"),
    (dict(prompt=[1, 2], max_tokens=511), "max_tokens", "510 positions"),
    (dict(prompt=[1], temperature=-1), "temperature", "temperature"),
    (dict(prompt=[1], temperature=1e-9), "temperature", "temperature"),
    (dict(prompt=[1], top_p=1.5), "top_p", "top_p"),
    (dict(prompt=[1], seed=-1), "seed", "seed"),
    (dict(prompt=[1], n=2), "n", "not supported"),
    (dict(prompt=[1], stop=[""]), "stop", "stop"),
    (dict(prompt=["a", "b"]), "prompt", "one per request"),
])
def test_bad_completions_are_400_naming_the_field(app, kw, param, words):
    status, error = openai_error(app["openai"].completions.create, model=app["model"].name, **{"max_tokens": 2, **kw})
    assert status == 400 and error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_nan_unknown_model_bad_json_and_bad_chat(app):
    for path, raw, param in (("completions", '{"prompt": [1], "temperature": NaN}', "temperature"),
                             ("completions", '{"prompt": [1], "top_p": Infinity}', "top_p"),
                             ("completions", '{"prompt": [1', None),
                             ("completions", '[1, 2]', None),
                             ("completions", '{"prompt": "a\\ud800b"}', "prompt"),
                             ("chat/completions", '{"messages": []}', "messages"),
                             ("chat/completions", '{"messages": [{"role": "tool", "content": "x"}]}', "messages"),
                             ("chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
                              "messages.0.content")):
        status, _, text = post(app, path, raw)
        assert status == 400 and json.loads(text)["error"]["param"] == param, (raw, text)
    status, error = openai_error(app["openai"].completions.create, model="gpt-4", prompt=[1], max_tokens=1)
    assert status == 404 and error["param"] == "model"
    for path, method in (("nothing", "GET"), ("models", "POST")):
        status, _, text = post(app, path, "{}", method)
        assert status in (404, 405) and "error" in json.loads(text)
    # a body past the limit is refused on its length, before it is sent whole
    conn = http.client.HTTPConnection(app["http"].removeprefix("http://"), timeout=60)
    conn.putrequest("POST", "/v1/completions")
    for k, v in (("authorization", f"Bearer {TOKEN}"), ("content-type", "application/json"),
                 ("content-length", str(9 << 20))):
        conn.putheader(k, v)
    conn.endheaders(b" " * (1 << 16))
    r = conn.getresponse()
    assert r.status == 400 and "over the limit" in json.loads(r.read())["error"]["message"]
    conn.close()


def test_a_bad_or_missing_token_is_401(app):
    bad = openai.OpenAI(base_url=f"{app['http']}/v1", api_key="wrong", max_retries=0, timeout=60)
    for call in (bad.models.list, lambda: bad.completions.create(model=app["model"].name, prompt=[1], max_tokens=1)):
        status, error = openai_error(call)
        assert status == 401 and error["type"] == "authentication_error" and "invalid bearer token" in error["message"]
    status, _, text = post(app, "completions", '{"prompt": [1], "max_tokens": 1}', token=None)
    assert status == 401 and "missing credentials" in json.loads(text)["error"]["message"]


def test_over_the_admission_limits_is_429(app):
    oa, name = app["openai"], app["model"].name
    # the one request the router admits, under way until this test has had its answer
    long = oa.completions.create(model=name, prompt=[3, 4], max_tokens=500, temperature=0, stream=True)
    first = next(iter(long))
    assert first.choices[0].token_ids
    for stream in (False, True):
        status, error = openai_error(oa.completions.create, model=name, prompt=[1], max_tokens=1, stream=stream)
        assert status == 429 and error["type"] == "rate_limit_error" and "overloaded" in error["message"]
    long.close()  # the client goes away: its generation is cancelled, the slot frees
    wait_until(lambda: running(app) == 0, 120, "the router has no request running")
    assert oa.completions.create(model=name, prompt=[1], max_tokens=1).choices[0].token_ids


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = {"model": st.sampled_from(["small", "x"]) | JSON,
          "prompt": st.text(max_size=30) | st.lists(st.integers(-3, 600), max_size=20) | JSON,
          "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                      "content": st.text(max_size=30) | JSON}), max_size=3) | JSON,
          "temperature": st.floats(-1, 3) | JSON, "top_p": st.floats(-0.5, 1.5) | JSON,
          "seed": st.integers(-1, 2**65) | JSON, "stop": st.text(max_size=3) | st.lists(st.text(max_size=3)) | JSON,
          "stream": st.booleans() | JSON, "n": st.integers(0, 2) | JSON, "top_k": st.integers(-1, 600) | JSON}


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["completions", "chat/completions"]),
       body=st.fixed_dictionaries({"max_tokens": st.integers(1, 4) | st.sampled_from([0, -1, 600, 2**64, "3", 2.5, True])},
                                  optional=FIELDS))
def test_fuzzed_bodies_get_no_5xx(app, path, body):
    """A 200 carries a completion, anything else an OpenAI error, and nothing is a 5xx."""
    try:
        raw = json.dumps(body)
    except ValueError:
        return
    status, _, text = post(app, path, raw)
    assert status < 500, (raw, status, text)
    if status != 200:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}, text
    elif body.get("stream") is True:
        assert text.endswith("data: [DONE]\n\n") and '"error"' not in text, text
    else:
        assert json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")


def test_no_router_is_503(app):
    """Last: the router moved to a node that does not exist, so no replica of it runs (the gateway stays)."""
    cfg = app["cfg"]
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Router":
            d["ray_actor_options"] = dict(d.get("ray_actor_options") or {}, resources={"no_such_node": 1})
    from ray.serve.schema import ServeDeploySchema
    serve_cfg = {k: v for k, v in cfg.items() if k not in ("http_options", "grpc_options", "proxy_location",
                                                           "controller_options")}
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(serve_cfg))
    wait_until(lambda: serve.status().applications["moe"].deployments["Router"].replica_states.get("RUNNING", 0) == 0,
               120, "no router replica")
    for stream in (False, True):
        status, error = openai_error(app["openai"].completions.create, model=app["model"].name, prompt=[1],
                                     max_tokens=1, stream=stream)
        assert status == 503 and error["code"] == "unavailable" and "router unavailable" in error["message"]
    status, _ = openai_error(app["openai"].chat.completions.create, model=app["model"].name,
                             messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert status == 503
