"""The expert data plane's credential: which key a process holds, how a call carries it, how it is checked.

Every ExpertService call and every doorbell connection proves it comes from this deployment with
one key, checked in constant time before any work. The key is, in order:

- `MOE_SERVE_DATA_KEY` (the key itself) or `MOE_SERVE_DATA_KEY_FILE` (a file holding it), for
  operators who hand out their own;
- else derived from Ray's cluster token (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`,
  the places Ray reads it from) by HMAC-SHA256 under a fixed label: every process of the cluster
  already holds that token, on every node, and a key leaked from the data plane does not give
  the token back;
- else a per-user key file, `~/.config/moe-serve/data_key`, created 0600 on first use: processes
  of one user on one machine (the standalone `python -m expert_service` and its clients) agree
  without configuration; it does not reach other nodes.

The key is read whenever a server or client is made, not cached: a Ray cluster started later
in the same process (tests do) brings a token, and with it the key its workers use.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct
from pathlib import Path

import grpc

KEY_ENV, KEY_FILE_ENV = "MOE_SERVE_DATA_KEY", "MOE_SERVE_DATA_KEY_FILE"
METADATA_KEY = "moe-data-key"  # gRPC metadata carrying the key (hex)
_LABEL = b"moe-serve expert data plane v1"


class AuthError(ValueError):
    """The caller did not prove it belongs to this deployment; the message says what is missing."""


def _ray_token() -> bytes | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip().encode()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path:
            try:
                token = Path(path).read_bytes().strip()
            except OSError:
                continue
            if token:
                return token
    return None


def _user_key() -> bytes:
    path = Path.home() / ".config" / "moe-serve" / "data_key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Written whole under a name of its own, then linked into place (link fails if the name is
    # taken): processes starting together agree on the first one's key and never read half a file.
    tmp = path.with_name(f".data_key.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


def data_key() -> str:
    """This process's data-plane key, as the hex string calls carry."""
    if os.environ.get(KEY_ENV):
        secret = os.environ[KEY_ENV].strip().encode()
    elif os.environ.get(KEY_FILE_ENV):
        try:
            secret = Path(os.environ[KEY_FILE_ENV]).read_bytes().strip()
        except OSError as e:
            raise AuthError(f"cannot read {KEY_FILE_ENV}={os.environ[KEY_FILE_ENV]}: {e.strerror}") from None
    else:
        token = _ray_token()
        secret = hmac.new(token, _LABEL, hashlib.sha256).digest() if token else _user_key()
    if not secret:
        raise AuthError("the data-plane key is empty")
    # Whatever its source, the key on the wire is a digest: fixed length, and not the source itself.
    return hmac.new(secret, _LABEL, hashlib.sha256).hexdigest()


def call_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, key),)


def check_key(given: str | bytes | None, key: str) -> None:
    """Raises AuthError unless `given` is `key`; constant time in the key's content."""
    if not given:
        raise AuthError(f"missing data-plane credential (metadata {METADATA_KEY!r})")
    given_b = given.encode() if isinstance(given, str) else bytes(given)
    if not hmac.compare_digest(given_b, key.encode()):
        raise AuthError("invalid data-plane credential")


def check_metadata(metadata, key: str) -> None:
    """The gRPC form: the key from invocation metadata."""
    check_key(next((v for k, v in metadata or () if k == METADATA_KEY), None), key)


def check_peer_role(auth_context: dict, role: str) -> None:
    """mTLS: the client certificate must name `role` (a DNS SAN or the CN), so a certificate the CA
    signed for another part of the system (the gateway's) does not pass as a router's."""
    names = {bytes(v).decode(errors="replace") if isinstance(v, (bytes, bytearray)) else str(v)
             for k in ("x509_subject_alternative_name", "x509_common_name") for v in auth_context.get(k, ())}
    if role not in names:
        raise AuthError(f"client certificate is not a {role!r} certificate")


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED, Linux)."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


class KeyInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Adds the key to every call of a blocking channel: grpc.intercept_channel(channel, KeyInterceptor(key))."""

    def __init__(self, key: str):
        self.metadata = call_metadata(key)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(details._replace(metadata=list(details.metadata or []) + list(self.metadata)), request)
