"""Request validation for the gateway: every rule, its gRPC status code, and a message that names
the field. Pure functions; the gateway turns a RequestError into a status, never a stack trace.

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
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(msg):
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, msg)


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
    if len(ids) == 0:
        raise _invalid(f"{field} is empty")
    if len(ids) > cfg.max_position_embeddings:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"{field} has {len(ids)} tokens; the context holds {cfg.max_position_embeddings}")
    ids = list(ids)
    for i, t in enumerate(ids):
        if not 0 <= t < cfg.vocab_size:
            raise _invalid(f"{field}[{i}] = {t} is out of range [0, {cfg.vocab_size})")
    return ids


def prompt_ids(request, cfg: MoEConfig, tokenizer) -> list[int]:
    if request.prompt_token_ids and request.prompt:
        raise _invalid("give prompt_token_ids or prompt, not both")
    if request.prompt:
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"prompt has {len(request.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        if tokenizer is None:
            raise _invalid("this model has no tokenizer.json; send prompt_token_ids instead of prompt")
        return check_token_ids(tokenizer.encode(request.prompt).ids, cfg, "prompt (tokenized)")
    if not request.prompt_token_ids:
        raise _invalid("prompt is empty: set prompt_token_ids or prompt")
    return check_token_ids(request.prompt_token_ids, cfg, "prompt_token_ids")


def sampling_params(sp, prompt_len: int, cfg: MoEConfig) -> SamplingParams:
    """SamplingParams message -> SamplingParams; 0 means unset for top_p and top_k, greedy for temperature."""
    if sp.max_new_tokens == 0:
        raise _invalid("sampling.max_new_tokens must be at least 1")
    room = cfg.max_position_embeddings - prompt_len
    if sp.max_new_tokens > room:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"sampling.max_new_tokens = {sp.max_new_tokens} exceeds the {room} positions "
                           f"left after a {prompt_len}-token prompt (context {cfg.max_position_embeddings})")
    t = sp.temperature
    if not math.isfinite(t) or not (t == 0 or _MIN_TEMPERATURE_F32 <= t <= MAX_TEMPERATURE):
        raise _invalid(f"sampling.temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                       f"got {t:g}")
    if not math.isfinite(sp.top_p) or not 0 <= sp.top_p <= 1:
        raise _invalid(f"sampling.top_p must be in [0, 1] (0 = unset), got {sp.top_p:g}")
    if sp.top_k < 0:
        raise _invalid(f"sampling.top_k must be >= 0 (0 = unset), got {sp.top_k}")
    return SamplingParams(max_new_tokens=sp.max_new_tokens, temperature=float(sp.temperature),
                          top_p=float(sp.top_p) or 1.0, top_k=sp.top_k,
                          seed=sp.seed if sp.HasField("seed") else None)
