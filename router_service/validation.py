"""Request validation for both fronts, the gRPC gateway and the OpenAI-compatible HTTP one: every
rule, its gRPC status code, and a message that names the field (`param`, as that front calls it).
Pure functions; the fronts turn a RequestError into a status, never a stack trace.

Cheap checks come first (sizes and lengths before values), so a huge request is refused in time
proportional to nothing but its length.
"""
from __future__ import annotations

import math

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from moe_core.config import MoEConfig
from router_service.sampling import SamplingParams

MAX_REQUEST_BYTES = 8 << 20   # a full-context prompt of ids is a few hundred KB; text is capped below
MAX_PROMPT_CHARS = 1 << 20
MAX_TEMPERATURE = 100.0
# Below this, logits / temperature overflows float32 to inf and sampling fails (NaN probabilities).
MIN_TEMPERATURE = 1e-4
_MIN_TEMPERATURE_F32 = float(np.float32(MIN_TEMPERATURE))  # the wire carries float32


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _invalid(msg, param=None):
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, msg, param)


def parse(data: bytes, cls, max_bytes: int = MAX_REQUEST_BYTES):
    """Raw request bytes -> message of `cls`; too large is RESOURCE_EXHAUSTED, corrupt INVALID_ARGUMENT."""
    if len(data) > max_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request is {len(data)} bytes; the limit is {max_bytes}")
    try:
        return cls.FromString(data)
    except (DecodeError, ValueError, RecursionError):
        raise _invalid(f"request is not a valid {cls.DESCRIPTOR.full_name} protobuf") from None


def check_token_ids(ids, cfg: MoEConfig, field: str) -> list[int]:
    param = field.split(" ")[0]
    if len(ids) == 0:
        raise _invalid(f"{field} is empty", param)
    if len(ids) > cfg.max_position_embeddings:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"{field} has {len(ids)} tokens; the context holds {cfg.max_position_embeddings}", param)
    ids = list(ids)
    for i, t in enumerate(ids):
        if not 0 <= t < cfg.vocab_size:
            raise _invalid(f"{field}[{i}] = {t} is out of range [0, {cfg.vocab_size})", param)
    return ids


def check_text(text: str, cfg: MoEConfig, tokenizer, field: str, instead: str, *,
               special_tokens: bool = True) -> list[int]:
    """Prompt text -> its checked token ids; `instead` is what to send without a tokenizer."""
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{field} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}", field)
    if tokenizer is None:
        raise _invalid(f"this model has no tokenizer.json; send {instead} instead of {field}", field)
    try:
        text.encode()
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON escape
        raise _invalid(f"{field} is not valid Unicode at character {e.start}", field) from None
    return check_token_ids(tokenizer.encode(text, add_special_tokens=special_tokens).ids, cfg, f"{field} (tokenized)")


def prompt_ids(request, cfg: MoEConfig, tokenizer) -> list[int]:
    if request.prompt_token_ids and request.prompt:
        raise _invalid("give prompt_token_ids or prompt, not both")
    if request.prompt:
        return check_text(request.prompt, cfg, tokenizer, "prompt", "prompt_token_ids")
    if not request.prompt_token_ids:
        raise _invalid("prompt is empty: set prompt_token_ids or prompt", "prompt")
    return check_token_ids(request.prompt_token_ids, cfg, "prompt_token_ids")


# What the sampling fields are called where a request names them (messages and `param` use these).
GRPC_FIELDS = {k: f"sampling.{k}" for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                   prompt_len: int, cfg: MoEConfig, names: dict = GRPC_FIELDS) -> SamplingParams:
    """-> SamplingParams; 0 means unset for top_p and top_k, greedy for temperature."""
    n = names["max_new_tokens"]
    if max_new_tokens < 1:
        raise _invalid(f"{n} must be at least 1", n)
    room = cfg.max_position_embeddings - prompt_len
    if max_new_tokens > room:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"{n} = {max_new_tokens} exceeds the {room} positions "
                           f"left after a {prompt_len}-token prompt (context {cfg.max_position_embeddings})", n)
    t = temperature
    if not math.isfinite(t) or not (t == 0 or _MIN_TEMPERATURE_F32 <= t <= MAX_TEMPERATURE):
        raise _invalid(f"{names['temperature']} must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                       f"got {t:g}", names["temperature"])
    if not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise _invalid(f"{names['top_p']} must be in [0, 1] (0 = unset), got {top_p:g}", names["top_p"])
    if top_k < 0:
        raise _invalid(f"{names['top_k']} must be >= 0 (0 = unset), got {top_k}", names["top_k"])
    if seed is not None and not 0 <= seed < 2**64:
        raise _invalid(f"{names['seed']} must be in [0, 2**64), got {seed}", names["seed"])
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature),
                          top_p=float(top_p) or 1.0, top_k=top_k, seed=seed)


def sampling_params(sp, prompt_len: int, cfg: MoEConfig) -> SamplingParams:
    """SamplingParams message -> SamplingParams."""
    return check_sampling(sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k,
                          sp.seed if sp.HasField("seed") else None, prompt_len, cfg)
