"""Transport security and caller authentication: gateway TLS, bearer tokens, router <-> expert mTLS.

- Gateway TLS. Ray Serve's gRPC proxy binds its port without TLS and has no option for it. Its
  `grpc_servicer_functions` run in the proxy process with the server before it starts, so
  `serve_tls` (listed there) binds a second, TLS port on the same server with
  `grpc.ssl_server_credentials`. Configured by the proxy's environment: MOE_SERVE_TLS_CERT,
  MOE_SERVE_TLS_KEY, MOE_SERVE_TLS_PORT, optional MOE_SERVE_TLS_CLIENT_CA (then clients need
  certificates too). Unset: nothing is bound.
- Bearer tokens. The gateway deployment compares `authorization: Bearer <token>` metadata with the
  tokens it was given (a file, one per line, so keys can rotate; or MOE_SERVE_TOKEN).
- Expert mTLS. `expert_tls` app args {ca, cert, key, client_cert?, client_key?, server_name?}:
  expert replicas serve with `require_client_auth` (expert_service.deployment.server_credentials),
  the router presents a client certificate (here).
"""
from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

import grpc

log = logging.getLogger("ray.serve")

TLS_CERT_ENV, TLS_KEY_ENV, TLS_PORT_ENV, TLS_CLIENT_CA_ENV = (
    "MOE_SERVE_TLS_CERT", "MOE_SERVE_TLS_KEY", "MOE_SERVE_TLS_PORT", "MOE_SERVE_TLS_CLIENT_CA")
TOKEN_ENV = "MOE_SERVE_TOKEN"
TLS_CA_ENV = "MOE_SERVE_TLS_CA"  # client side: the CA that signed the gateway's certificate


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


# -- gateway TLS (runs in Serve's proxy process) -----------------------------------------------

def serve_tls(servicer, server) -> None:
    """A `grpc_servicer_functions` entry: binds the TLS port when MOE_SERVE_TLS_CERT is set."""
    cert = os.environ.get(TLS_CERT_ENV)
    if not cert:
        return
    key, port = os.environ.get(TLS_KEY_ENV), os.environ.get(TLS_PORT_ENV)
    if not key or not port:
        raise ValueError(f"{TLS_CERT_ENV} is set; {TLS_KEY_ENV} and {TLS_PORT_ENV} must be set too")
    client_ca = os.environ.get(TLS_CLIENT_CA_ENV)
    creds = grpc.ssl_server_credentials([(_read(key), _read(cert))],
                                        root_certificates=_read(client_ca) if client_ca else None,
                                        require_client_auth=bool(client_ca))
    if not server.add_secure_port(f"[::]:{int(port)}", creds):
        raise OSError(f"cannot bind the gateway's TLS port {port}")
    log.info("gateway TLS on port %s (client certificates %s)", port, "required" if client_ca else "not required")


def used_tls(grpc_context) -> bool:
    """Whether the call came over TLS (the proxy copies the auth context into the request)."""
    kinds = grpc_context.auth_context().get("transport_security_type", [])
    return b"ssl" in kinds or "ssl" in kinds


# -- bearer tokens -------------------------------------------------------------------------------

def load_tokens(token_file: str | None = None) -> list[bytes]:
    """Tokens from `token_file` (one per line, blank lines and #comments skipped) or MOE_SERVE_TOKEN.
    Empty: no authentication."""
    if token_file:
        lines = _read(token_file).decode().splitlines()
        tokens = [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
        if not tokens:
            raise ValueError(f"token file {token_file} holds no token")
    else:
        tokens = [os.environ[TOKEN_ENV]] if os.environ.get(TOKEN_ENV) else []
    return [t.encode() for t in tokens]


def check_bearer(metadata, tokens: list[bytes]) -> str | None:
    """None when the call may proceed, else why not (for UNAUTHENTICATED)."""
    if not tokens:
        return None
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        return "missing credentials: send metadata 'authorization: Bearer <token>'"
    scheme, _, given = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not given:
        return "authorization metadata must be 'Bearer <token>'"
    given_b = given.strip().encode()
    # compare against every token so the time taken does not say which one nearly matched
    if not any([hmac.compare_digest(given_b, t) for t in tokens]):
        return "invalid bearer token"
    return None


# -- router <-> expert mTLS ---------------------------------------------------------------------

def expert_channel_credentials(tls: dict | None) -> grpc.ChannelCredentials | None:
    if not tls:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls["ca"]),
                                        private_key=_read(tls.get("client_key", tls["key"])),
                                        certificate_chain=_read(tls.get("client_cert", tls["cert"])))


def expert_channel_options(tls: dict | None) -> list[tuple[str, str]]:
    """Expert addresses are node IPs; a certificate issued for one name (`server_name`) instead of
    every node's IP is checked against that name."""
    if tls and tls.get("server_name"):
        return [("grpc.ssl_target_name_override", tls["server_name"])]
    return []


# -- client side ------------------------------------------------------------------------------

class _BearerAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the authorization metadata to every call (works on plaintext channels too, unlike
    grpc.access_token_call_credentials)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return details._replace(metadata=list(details.metadata or []) + [self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


def client_channel(address: str, options, *, ca: str | None = None, token: str | None = None,
                   cert: str | None = None, key: str | None = None,
                   server_name: str | None = None) -> grpc.Channel:
    """A channel to the gateway: TLS when `ca` (PEM file of the CA) is given, a client certificate
    when `cert`/`key` are, the bearer token on every call when `token` is."""
    if ca:
        creds = grpc.ssl_channel_credentials(_read(ca), _read(key) if key else None, _read(cert) if cert else None)
        extra = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        ch = grpc.secure_channel(address, creds, options=list(options) + extra)
    else:
        ch = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(ch, _BearerAuth(token)) if token else ch
