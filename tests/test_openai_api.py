"""The OpenAI HTTP front without a cluster: chat templates rendered as transformers renders them,
text held back at stop strings and split characters, request bodies, errors in OpenAI's shape."""
from __future__ import annotations

import json
import types

import grpc
import pytest
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from moe_core.config import preset
from moe_core.tokenizer import load_chat_template, load_tokenizer, write_tokenizer
from router_service.engine import Overloaded
from router_service.gateway import RouterUnavailable, openai_api
from router_service.gateway.admission import ClientShare
from router_service.sampling import SamplingParams
from router_service.validation import RequestError
from tests.conftest import run

CFG = preset("tiny")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"},
        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "  two\n lines "}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, CFG.vocab_size)
    return d


def front(model_dir, tokens: list[int], template=True):
    """The front's own logic, with the router's tokens replaced by `tokens`."""
    g = object.__new__(openai_api.OpenAIGateway)
    g.cfg, g.tokenizer = CFG, load_tokenizer(model_dir)
    g.chat_template = load_chat_template(model_dir) if template else None

    async def fake(ids, params):
        for i, t in enumerate(tokens):
            yield t, "length" if i == len(tokens) - 1 else None
    g.client = types.SimpleNamespace(tokens=fake)
    g.share = ClientShare()
    return g


def pieces(g, stop):
    async def go():
        return [p async for p in g._pieces([1], SamplingParams(), stop, "host:127.0.0.1")]
    return run(go())


def test_init_model_template_renders_as_transformers_does(model_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(model_dir)
    template = load_chat_template(model_dir)
    assert template.render(CHAT) == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert template.render(CHAT, add_generation_prompt=False) == hf.apply_chat_template(CHAT, tokenize=False)
    want = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert front(model_dir, [])._chat_prompt([openai_api._Message(**m) for m in CHAT]) == want


def test_a_hub_style_template_and_its_exceptions(tmp_path, model_dir):
    """A template as Hub checkpoints write them (a list of named ones, dict-form special tokens,
    raise_exception, whitespace control), against transformers on the same files."""
    from transformers import AutoTokenizer
    (tmp_path / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    source = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}\n"
              "{{ bos_token }}\n{% for m in messages %}\n  {% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
              "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}\n{% endfor %}")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>",
              "chat_template": [{"name": "default", "template": source}, {"name": "rag", "template": "x"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat = CHAT[1:]
    assert load_chat_template(tmp_path).render(chat, False) == AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        chat, tokenize=False)
    g = front(tmp_path, [])
    g.chat_template = load_chat_template(tmp_path)
    with pytest.raises(RequestError, match="no system role") as e:
        g._chat_prompt([openai_api._Message(**m) for m in CHAT])
    assert e.value.param == "messages"


def test_no_template_is_a_clear_400_for_chat(model_dir):
    with pytest.raises(RequestError, match="no chat template") as e:
        front(model_dir, [], template=False)._chat_prompt([openai_api._Message(role="user", content="hi")])
    assert openai_api.error_response(e.value).status_code == 400


def test_stop_strings_cut_the_text_and_nothing_past_them_is_shown(model_dir):
    tok = load_tokenizer(model_dir)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text).ids
    assert len(ids) > 5
    for stop in (["fox"], ["jumps over", "lazy"], ["o"], ["dog.", "zzz"]):
        got = pieces(front(model_dir, ids), stop)
        shown = "".join(p[0] for p in got)
        at = min(text.find(s) for s in stop if s in text)
        assert shown == text[:at] and got[-1][2] == "stop", (stop, shown)
        # the generation ended with the token that completed the stop string
        assert sum(len(p[1]) for p in got) == next(k for k in range(len(ids) + 1)
                                                   if any(s in tok.decode(ids[:k]) for s in stop))
    got = pieces(front(model_dir, ids), ["cat"])  # a stop string that never comes: all of it
    assert "".join(p[0] for p in got) == text and got[-1][2] == "length" and len(got) == len(ids)


def test_split_characters_are_held_back_until_whole(model_dir):
    tok = load_tokenizer(model_dir)
    text = "naïve café ☕ 😀!"
    ids = tok.encode(text).ids
    got = pieces(front(model_dir, ids), [])
    assert "".join(p[0] for p in got) == text
    assert not any("\ufffd" in p[0] for p in got)
    assert any(p[0] == "" for p in got)  # some tokens were a character's first bytes


def test_held_back():
    assert openai_api._held_back("abc STO", ["STOP"]) == 4
    assert openai_api._held_back("abc ST", ["xy", "STOP"]) == 4
    assert openai_api._held_back("abc \ufffd", []) == 4
    assert openai_api._held_back("abc", ["STOP"]) == 3


@pytest.mark.parametrize("body, param, words", [
    ({}, "prompt", "Field required"),
    ({"prompt": [1, True]}, "prompt", "a list of token ids"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens", "integer"),
    ({"prompt": "x", "stop": [1]}, "stop", "list of strings"),
    ({"prompt": "x", "n": 2}, "n", "not supported"),
    ({"prompt": "x", "n": True}, "n", "not supported"),
    ({"prompt": "x", "echo": True}, "echo", "not supported"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"prompt": "x", "model": "gpt-4"}, "model", "not served here"),
])
def test_bodies_refused_with_the_field_named(body, param, words):
    class Req:
        headers = {"content-length": str(len(json.dumps(body)))}
        url = type("U", (), {"scheme": "http"})

        async def stream(self):
            yield json.dumps(body).encode()
    g = object.__new__(openai_api.OpenAIGateway)
    g.tokens, g.require_tls, g.max_request_bytes, g.model_name = [], False, 1 << 20, "tiny"
    with pytest.raises(RequestError) as e:
        run(g._body(Req(), openai_api.CompletionBody))
    assert e.value.param == param and words in e.value.message, e.value.message
    # defaults a client sends pass
    ok = {"prompt": "x", "n": 1, "echo": False, "presence_penalty": 0.0, "logprobs": None, "model": "tiny"}
    body = ok
    assert run(g._body(Req(), openai_api.CompletionBody)).prompt == "x"


def _ray_wrapped(cause):
    return RayTaskError("generate", "Traceback (most recent call last):\n  secret frame", cause).as_instanceof_cause()


@pytest.mark.parametrize("error, status, code", [
    (RequestError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1", "max_tokens"), 400, "invalid_argument"),
    (RequestError(grpc.StatusCode.OUT_OF_RANGE, "prompt has 600 tokens", "prompt"), 400, "out_of_range"),
    (RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "prompt has 2000000 characters", "prompt"), 400,
     "resource_exhausted"),
    (RequestError(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"), 401, "unauthenticated"),
    (Overloaded("2 requests in flight"), 429, "resource_exhausted"),
    (BackPressureError(num_queued_requests=5, max_queued_requests=5), 429, "resource_exhausted"),
    (RouterUnavailable("router unavailable (no running replica), retry shortly"), 503, "unavailable"),
    (TimeoutError("deadline exceeded"), 504, "deadline_exceeded"),
    (KeyError("internal detail"), 503, "unavailable"),
])
def test_errors_in_openais_shape_without_tracebacks(error, status, code):
    for e in (error, _ray_wrapped(error)):
        r = openai_api.error_response(e)
        body = json.loads(r.body)
        assert r.status_code == status and set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
        assert "Traceback" not in body["error"]["message"] and "internal detail" not in body["error"]["message"]
        assert body["error"]["param"] == getattr(error, "param", None)
        assert (r.headers.get("retry-after") == "1") == (status in (429, 503))


def test_http_port_from_up_and_the_cli(tiny_model):
    from moe_serve.cli import build_parser
    from moe_serve.launcher import load_config
    assert load_config(model=str(tiny_model))["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert load_config(model=str(tiny_model), http_port=8123)["http_options"]["port"] == 8123
    assert build_parser().parse_args(["up"]).http_port == 8000
    assert build_parser().parse_args(["up", "--http-port", "8123"]).http_port == 8123
    assert load_config(model=str(tiny_model))["applications"][0]["route_prefix"] == "/"  # the routes are /v1/...
