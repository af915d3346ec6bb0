"""The pool's `connect(shard, address)` for a channel chosen by name in the serving config."""
from __future__ import annotations

from moe_core.codec import keep_large_buffers
from router_service.channels import CHANNELS
from router_service.channels.grpc_bytes import EXPERT_CHANNEL_OPTIONS, BytesChannel
from router_service.channels.session import SessionChannel

LOOPBACK = frozenset({"127.0.0.1", "localhost"})


def connector(kind: str, *, local_hosts: frozenset[str] | None = None, handles: dict | None = None,
              credentials=None, channel_options=(), wire_dtype: str | None = None, key: str | None = None):
    """`kind` is one of CHANNELS. "shm" and "cuda_ipc" reach replicas on one of `local_hosts` (this
    node; default LOOPBACK) through sessions and the others as bytes, the way between nodes;
    "handle" calls through `handles[shard]`."""
    if kind not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {kind!r}")
    keep_large_buffers()
    local_hosts = local_hosts or LOOPBACK
    options = dict(options=EXPERT_CHANNEL_OPTIONS + list(channel_options), credentials=credentials,
                   wire_dtype=wire_dtype, key=key)

    def connect(shard: str, address: str):
        if kind == "handle":
            from router_service.channels.handle import HandleChannel  # imports Ray
            return HandleChannel(address, handles[shard])
        if kind in ("shm", "cuda_ipc") and address.rsplit(":", 1)[0] in local_hosts:
            return SessionChannel(address, kind, **options)
        return BytesChannel(address, **options)
    return connect
