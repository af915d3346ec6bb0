"""The OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions and /v1/models on Serve's
HTTP port, in OpenAI's request and reply shapes (server-sent events ending in `data: [DONE]` when
streaming), errors as `{"error": {"message", "type", "param", "code"}}`.

A Serve application has one ingress deployment, and Serve's gRPC proxy reaches an application
without being told its name only while it is the only one; so the gateway's deployment takes the
HTTP requests too (this subclass of the gRPC servicer, FastAPI through `serve.ingress`; `Gateway`,
at the end, is the deployment). Both fronts share the RouterClient (liveness, resumption), the
validation rules, the bearer tokens, and the mapping of what goes wrong; only the encoding
differs. The gRPC status of an error picks its HTTP status.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from moe_core.tokenizer import load_chat_template
from router_service import security, validation
from router_service.gateway.admission import client_id
from router_service.gateway.grpc_ingress import GrpcGateway, _status
from router_service.gateway.router_client import service_error
from router_service.validation import RequestError

api = FastAPI(title="moe-serve", docs_url=None, redoc_url=None, openapi_url=None)

HTTP_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "seed": "seed"}
CODE = grpc.StatusCode
HTTP_STATUS = {CODE.INVALID_ARGUMENT: 400, CODE.OUT_OF_RANGE: 400, CODE.NOT_FOUND: 404, CODE.UNAUTHENTICATED: 401,
               CODE.RESOURCE_EXHAUSTED: 429, CODE.DEADLINE_EXCEEDED: 504, CODE.CANCELLED: 499}
ERROR_TYPE = {400: "invalid_request_error", 404: "invalid_request_error", 401: "authentication_error",
              429: "rate_limit_error"}
MAX_STOP = 4
# Accepted only at these values (what OpenAI's clients send by default); anything else is a 400.
ONLY = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
        "top_logprobs": (None, 0), "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
        "logit_bias": (None, {}), "tools": (None, []), "functions": (None, [])}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str = ""


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[_Part] | None = None


class ChatBody(_Body):
    messages: list[_Message]
    max_completion_tokens: int | None = None


FIELDS = {f for m in (CompletionBody, ChatBody, _Message, _Part) for f in m.model_fields}
UNIONS = {"prompt": "a string, a list of token ids, or a list of one of those", "stop": "a string or a list of strings",
          "content": "a string or a list of text parts"}


def _invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(CODE.INVALID_ARGUMENT, message, param)


def error_response(e: BaseException) -> JSONResponse:
    cause = service_error(e)
    code, message = _status(e)
    status = HTTP_STATUS.get(code, 503)
    if code == CODE.RESOURCE_EXHAUSTED and isinstance(cause, RequestError):
        status = 400  # a request past a size limit, not the server's load
    body = {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"),
                      "param": getattr(cause, "param", None), "code": code.name.lower()}}
    headers = {"retry-after": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Unknown paths and methods, in OpenAI's shape too."""
    return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {e.detail}",
                                   "type": "invalid_request_error", "param": None, "code": None}},
                        status_code=e.status_code)


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    """Whatever escaped a route: logged by the mapping, answered as a 503 without details."""
    return error_response(e)


def _explain(error: dict) -> tuple[str, str | None]:
    """A pydantic error -> (message, param); param as OpenAI writes it (messages.0.content)."""
    loc = [x for x in error["loc"] if isinstance(x, int) or x in FIELDS]
    param = ".".join(map(str, loc)) or None
    if len(loc) < len(error["loc"]) and loc and loc[-1] in UNIONS:  # a union's member named the error
        return f"{param} must be {UNIONS[loc[-1]]}", param
    return (f"{param}: {error['msg']}" if param else error["msg"]), param


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _held_back(text: str, stop: list[str]) -> int:
    """How much of `text` may be shown while generation goes on: not a trailing incomplete UTF-8
    sequence (decoded as U+FFFD), nor an end that may yet become a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.startswith(s[:k], end - k):
                end -= k
                break
    return end


class OpenAIGateway(GrpcGateway):
    """The gRPC servicer with the OpenAI HTTP routes (`Gateway`, below, is their deployment)."""

    def __init__(self, router, model_dir: str, *args, **kw):
        super().__init__(router, model_dir, *args, **kw)
        self.model_name = os.path.basename(os.path.normpath(model_dir))
        self.chat_template = load_chat_template(model_dir)
        self.created = int(time.time())

    # -- routes ----------------------------------------------------------------------------------

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._caller(request)
            return JSONResponse({"object": "list", "data": [self._model_card()]})
        except Exception as e:
            return error_response(e)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Response:
        try:
            self._caller(request)
            self._check_model(model_id)
            return JSONResponse(self._model_card())
        except Exception as e:
            return error_response(e)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            body = await self._body(request, CompletionBody)
            ids = self._prompt(body.prompt)
            return await self._reply(body, ids, 16 if body.max_tokens is None else body.max_tokens,
                                     chat=False, client=self._http_client(request))
        except Exception as e:
            return error_response(e)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self._body(request, ChatBody)
            ids = self._chat_prompt(body.messages)
            n = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
            return await self._reply(body, ids, n if n is not None else self.cfg.max_position_embeddings - len(ids),
                                     chat=True, client=self._http_client(request))
        except Exception as e:
            return error_response(e)

    # -- requests --------------------------------------------------------------------------------

    def _caller(self, request: Request) -> None:
        if self.require_tls and request.url.scheme != "https":
            raise RequestError(CODE.UNAUTHENTICATED, "this gateway accepts TLS connections only")
        why = security.check_bearer(request.headers.items(), self.tokens)
        if why:
            raise RequestError(CODE.UNAUTHENTICATED, why.replace("metadata", "header"))

    def _http_client(self, request: Request) -> str:
        return client_id(request.headers.items(), request.client.host if request.client else None, self.tokens)

    async def _body(self, request: Request, cls):
        """The caller checked, then the JSON body (at most max_request_bytes) as `cls`."""
        self._caller(request)
        size = request.headers.get("content-length", "")
        too_big = RequestError(CODE.RESOURCE_EXHAUSTED, f"the request body is over the limit of "
                                                        f"{self.max_request_bytes} bytes")
        if size.isdigit() and int(size) > self.max_request_bytes:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_request_bytes:
                raise too_big
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            raise _invalid("the request body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise _invalid("the request body must be a JSON object")
        try:
            body = cls.model_validate(obj)
        except ValidationError as e:
            raise _invalid(*_explain(e.errors()[0])) from None
        except RecursionError:
            raise _invalid("the request body nests too deeply") from None
        self._check_model(body.model)
        for name, allowed in ONLY.items():
            value = (body.model_extra or {}).get(name)
            if not any(value is a or (value == a and isinstance(value, bool) == isinstance(a, bool)) for a in allowed):
                raise _invalid(f"{name} = {json.dumps(value)[:40]} is not supported here", name)
        return body

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(CODE.NOT_FOUND, f"model {model[:100]!r} is not served here; this serves "
                                               f"{self.model_name!r}", "model")

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "moe-serve",
                "max_model_len": self.cfg.max_position_embeddings}

    def _prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise _invalid(f"prompt holds {len(prompt)} prompts; send one per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return validation.check_text(prompt, self.cfg, self.tokenizer, "prompt", "a list of token ids")
        return validation.check_token_ids(prompt, self.cfg, "prompt")

    def _chat_prompt(self, messages: list[_Message]) -> list[int]:
        import jinja2

        if self.chat_template is None:
            raise _invalid("this model has no chat template (tokenizer_config.json's chat_template); "
                           "use /v1/completions", "messages")
        if not messages:
            raise _invalid("messages is empty", "messages")
        plain = []
        for i, m in enumerate(messages):
            parts = m.content if isinstance(m.content, list) else []
            if any(p.type != "text" for p in parts):
                raise _invalid(f"messages[{i}].content: only text parts are supported", f"messages.{i}.content")
            plain.append({"role": m.role, "content": "".join(p.text for p in parts) if parts else m.content or ""})
        if sum(len(m["content"]) for m in plain) > validation.MAX_PROMPT_CHARS:
            raise RequestError(CODE.RESOURCE_EXHAUSTED, f"messages hold more than {validation.MAX_PROMPT_CHARS} "
                                                        "characters", "messages")
        try:
            text = self.chat_template.render(plain)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise _invalid(f"the chat template refused these messages: {str(e)[:200]}", "messages") from None
        return validation.check_text(text, self.cfg, self.tokenizer, "messages", "/v1/completions with token ids",
                                     special_tokens=False)

    # -- replies ---------------------------------------------------------------------------------

    async def _reply(self, body: _Body, ids: list[int], max_tokens: int, *, chat: bool, client: str) -> Response:
        params = validation.check_sampling(max_tokens, body.temperature, body.top_p, body.top_k, body.seed,
                                           len(ids), self.cfg, HTTP_FIELDS)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or not all(stop):
            raise _invalid(f"stop takes up to {MAX_STOP} non-empty strings", "stop")
        if stop and self.tokenizer is None:
            raise _invalid("stop needs text, and this model has no tokenizer.json", "stop")
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}
        pieces = self._pieces(ids, params, stop, client)
        if body.stream:
            return await self._stream(pieces, head, len(ids), chat, bool((body.stream_options or {}).get("include_usage")))
        text, tokens, reason = "", [], None
        async with contextlib.aclosing(pieces):
            async for delta, new, reason in pieces:
                text, tokens = text + delta, tokens + new
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text}) | {"finish_reason": reason, "logprobs": None, "token_ids": tokens}
        return JSONResponse(head | {"choices": [choice], "usage": _usage(len(ids), len(tokens))})

    async def _pieces(self, ids: list[int], params, stop: list[str], client: str):
        """(text, token ids, finish_reason or None) as the tokens come: the text each token adds,
        held back while it may be the start of a stop string; the generation ends at a stop string."""
        tokens, shown = [], 0
        async with contextlib.aclosing(self._tokens(ids, params, client)) as stream:
            async for token, reason in stream:
                tokens.append(token)
                text = self._text(tokens)
                at = min((i for s in stop if (i := text.find(s, max(0, shown - len(s) + 1))) != -1), default=None)
                if at is not None:
                    yield text[shown:max(at, shown)], [token], "stop"
                    return
                end = len(text) if reason else _held_back(text, stop)
                yield text[shown:end], [token], reason
                shown = max(shown, end)

    async def _stream(self, pieces, head: dict, prompt_len: int, chat: bool, usage: bool) -> Response:
        """Server-sent events; the first token is awaited first, so that a request refused before it
        (overload, no router) gets its status code rather than an event."""
        head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}
        try:
            first = await anext(pieces)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await pieces.aclose()
            raise

        def event(delta: str, new: list[int], reason) -> str:
            choice = {"index": 0, "delta": {"content": delta} if delta or not reason else {}} if chat else \
                {"index": 0, "text": delta}
            return _sse(head | {"choices": [choice | {"finish_reason": reason, "logprobs": None, "token_ids": new}]})

        async def events():
            n = 0
            try:
                if chat:
                    yield _sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None, "logprobs": None}]})
                if first is not None:
                    n += len(first[1])
                    yield event(*first)
                async for piece in pieces:
                    n += len(piece[1])
                    yield event(*piece)
                if usage:
                    yield _sse(head | {"choices": [], "usage": _usage(prompt_len, n)})
            except Exception as e:  # after the 200: the error as an event, as OpenAI sends it
                yield _sse(json.loads(error_response(e).body))
            finally:
                await pieces.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


Gateway = serve.deployment(name="Gateway", max_ongoing_requests=2048, health_check_period_s=2)(
    serve.ingress(api)(OpenAIGateway))
