"""A per-client share of the router's admission: at most `limit` requests in flight per client, so
one caller cannot hold every slot the engine admits (max_running + max_queued) while others wait.

A client is its bearer token where the gateway takes tokens (a digest of it: the token itself is
not kept), else the host it calls from. Behind a proxy or NAT that is every caller of that host:
give each a token of its own there.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections import Counter

import grpc

from router_service.validation import RequestError


def client_id(metadata, peer: str | None, tokens: list[bytes]) -> str:
    """The caller: `metadata` (gRPC metadata or HTTP headers as pairs) holds its bearer token when
    `tokens` are configured; `peer` is gRPC's ("ipv4:10.0.0.7:5123") or an HTTP client's host."""
    if tokens:
        for key, value in metadata:
            if key.lower() == "authorization":
                return "token:" + hashlib.sha256(str(value).encode()).hexdigest()[:16]
    kind, _, address = (peer or "").partition(":")
    return "host:" + (address.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer or "")


class ClientShare:
    def __init__(self, limit: int | None = None):
        if limit is not None and limit < 1:
            raise ValueError(f"max_requests_per_client must be at least 1, got {limit}")
        self.limit = limit
        self.held: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, client: str):
        """One of `client`'s requests in flight, for as long as the block runs; RESOURCE_EXHAUSTED
        when it has `limit` already."""
        if self.limit is not None and self.held[client] >= self.limit:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"this client has {self.held[client]} requests in flight, the most one client "
                               f"may have (max_requests_per_client)")
        self.held[client] += 1
        try:
            yield
        finally:
            self.held[client] -= 1
            if not self.held[client]:
                del self.held[client]
