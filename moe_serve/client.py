"""A small client for the gateway: what the CLI's remote commands and the tests call.

TLS and bearer tokens: pass `ca` / `token` to `channel`, or set MOE_SERVE_TLS_CA (PEM file of the
CA that signed the gateway's certificate; the address is then the TLS port) and MOE_SERVE_TOKEN.
"""
from __future__ import annotations

import os

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe.v1 import gateway_pb2, gateway_pb2_grpc
from moe_core.codec import decode
from router_service import security

MAX_MESSAGE_BYTES = 512 << 20  # above any gateway's message limit (ScoreStream chunks fit it)
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def channel(address: str, *, ca: str | None = None, token: str | None = None) -> grpc.Channel:
    """None: from the environment; "": none."""
    ca = os.environ.get(security.TLS_CA_ENV) if ca is None else ca
    token = os.environ.get(security.TOKEN_ENV) if token is None else token
    return security.client_channel(address, OPTIONS, ca=ca or None, token=token or None)


def request(prompt_ids=None, prompt=None, params=None) -> gateway_pb2.GenerateRequest:
    sp = gateway_pb2.SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                    top_p=params.top_p, top_k=params.top_k)
    if params.seed is not None:
        sp.seed = params.seed
    return gateway_pb2.GenerateRequest(prompt_token_ids=prompt_ids or [], prompt=prompt or "", sampling=sp)


def generate(address, *, prompt_ids=None, prompt=None, params, stream=False, timeout=120.0) -> dict:
    with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        req = request(prompt_ids, prompt, params)
        if not stream:
            r = stub.Complete(req, timeout=timeout)
            return {"token_ids": list(r.token_ids), "finish_reason": r.finish_reason, "text": r.text}
        tokens, text, reason = [], "", ""
        for chunk in stub.Generate(req, timeout=timeout):
            tokens += chunk.token_ids
            text += chunk.text
            reason = chunk.finish_reason or reason
            print(f"{list(chunk.token_ids)} {chunk.text!r}", flush=True)
        return {"token_ids": tokens, "finish_reason": reason, "text": text}


def score(address, token_ids, *, timeout=120.0) -> np.ndarray:
    """float32 logits [T, vocab], through ScoreStream (any T fits)."""
    rows = []
    with channel(address) as ch:
        for chunk in gateway_pb2_grpc.GatewayStub(ch).ScoreStream(gateway_pb2.ScoreRequest(token_ids=token_ids),
                                                                  timeout=timeout):
            if chunk.first_row != sum(len(r) for r in rows):
                raise ValueError(f"ScoreStream sent row {chunk.first_row} out of order")
            rows.append(decode(chunk.logits, allowed_dtypes=("float32",), max_elements=MAX_MESSAGE_BYTES // 4).numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def stats(address, *, timeout=30.0, ca=None, token=None) -> gateway_pb2.StatsReply:
    with channel(address, ca=ca, token=token) as ch:
        return gateway_pb2_grpc.GatewayStub(ch).Stats(gateway_pb2.StatsRequest(), timeout=timeout)


def healthy(address, *, timeout=5.0, ca=None, token=None) -> bool:
    try:
        with channel(address, ca=ca, token=token) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
