"""Security: gateway TLS and bearer tokens, router <-> expert mTLS, Ray's own token authentication.

Certificates are made here, at test time (tests/pki.py). The no-Ray tests check each piece on
plain gRPC servers; the cluster test runs them together in Serve's real proxy and replicas.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
import ray
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expert_service.deployment import server_credentials
from expert_service.experts import ExpertShard
from expert_service.server import start_server
from moe.v1 import gateway_pb2, gateway_pb2_grpc
from moe_core.checkpoint import Checkpoint, all_pairs
from moe_serve import client
from router_service import security
from router_service.channels.grpc_bytes import BytesChannel
from router_service.dispatch import remote_dispatcher
from router_service.engine import local_engine
from router_service.sampling import SamplingParams
from tests.cluster_fixtures import free_port, running_app
from tests.conftest import run
from tests.pki import CA
from tests.reliability_helpers import call, directory_table, experts, small_model, wait_until

OK, UNAUTHENTICATED, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, stranger = CA(d), CA(d / "stranger", "stranger CA")
    return {"ca": ca, "stranger": stranger, "dir": d,
            "gateway": ca.issue("gateway", dns=["localhost"], ips=["127.0.0.1"]),
            # one name for the expert data plane, whatever node IP a replica listens on
            "expert": ca.issue("moe-expert", dns=["moe-expert"]),
            "router": ca.issue("moe-router"),
            "stranger_client": stranger.issue("intruder")}


def expert_tls(pki, **override):
    cert, key = pki["expert"]
    client_cert, client_key = pki["router"]
    return {"ca": pki["ca"].path, "cert": cert, "key": key, "client_cert": client_cert,
            "client_key": client_key, "server_name": "moe-expert"} | override


# -- no Ray -------------------------------------------------------------------------------------

def test_expert_mtls_refuses_clients_without_a_router_certificate(pki, tiny_model):
    tls = expert_tls(pki)
    pairs = all_pairs(Checkpoint(tiny_model).config)
    shard = ExpertShard.load(Checkpoint(tiny_model), pairs)
    x = torch.randn(6, 64)

    async def go():
        server, port = await start_server(shard, credentials=server_credentials(tls), client_role="moe-router")
        address = f"127.0.0.1:{port}"
        options = client.OPTIONS + security.expert_channel_options(tls)
        try:
            outcomes = {}
            # a certificate the same CA signed for another role (the gateway's) is not a router's
            gateway_cert, gateway_key = pki["gateway"]
            async with BytesChannel(address, options=options, credentials=security.expert_channel_credentials(
                    tls | {"client_cert": gateway_cert, "client_key": gateway_key})) as c:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.info(timeout=10)
                assert e.value.code() == UNAUTHENTICATED and "'moe-router' certificate" in e.value.details()
            stranger_cert, stranger_key = pki["stranger_client"]
            for who, creds in {
                "plaintext": None,
                "tls without a client certificate": grpc.ssl_channel_credentials(open(pki["ca"].path, "rb").read()),
                "certificate from another CA": security.expert_channel_credentials(
                    tls | {"client_cert": stranger_cert, "client_key": stranger_key}),
            }.items():
                async with BytesChannel(address, options=options, credentials=creds) as c:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await c.info(timeout=10)
                    outcomes[who] = e.value.code()
            # the router's own wiring: its remote dispatcher with the credentials app args give it
            async def lookup():
                return {"all": [address]}
            d = remote_dispatcher({p: "all" for p in pairs}, lookup,
                               credentials=security.expert_channel_credentials(tls),
                               channel_options=security.expert_channel_options(tls))
            try:
                y = await d.run_experts(1, x, [2, 0, 0, 1, 0, 3, 0, 0])
            finally:
                await d.close()
            return outcomes, y
        finally:
            await server.stop(None)

    outcomes, y = run(go())
    assert outcomes == {k: UNAVAILABLE for k in outcomes}, outcomes
    want = shard.forward(x, [(1, 0, 2), (1, 3, 1), (1, 5, 3)])
    assert torch.equal(y, want)


def test_serve_tls_hook_binds_a_tls_port(pki, monkeypatch):
    """The grpc_servicer_functions entry Serve's proxy runs, on a plain grpc.aio server."""
    cert, key = pki["gateway"]
    port = free_port()

    async def go():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        security.serve_tls(None, server)
        await server.start()
        try:
            results = {}
            for who, ca in {"right CA": pki["ca"].path, "other CA": pki["stranger"].path, "plaintext": ""}.items():
                with client.channel(f"localhost:{port}", ca=ca, token="") as ch:
                    results[who] = await asyncio.to_thread(
                        call, health_pb2_grpc.HealthStub(ch).Check, health_pb2.HealthCheckRequest(), timeout=10)
            return results
        finally:
            await server.stop(None)

    monkeypatch.setenv(security.TLS_CERT_ENV, cert)
    monkeypatch.setenv(security.TLS_KEY_ENV, key)
    monkeypatch.setenv(security.TLS_PORT_ENV, str(port))
    results = run(go())
    assert results["right CA"][0] == OK and results["right CA"][2].status == health_pb2.HealthCheckResponse.SERVING
    assert results["other CA"][0] == UNAVAILABLE and "handshake" in results["other CA"][2].lower()
    assert results["plaintext"][0] == UNAVAILABLE

    monkeypatch.delenv(security.TLS_KEY_ENV)
    with pytest.raises(ValueError, match="MOE_SERVE_TLS_KEY"):
        security.serve_tls(None, object())  # refused before the server is touched


# -- on a cluster -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(pki, tmp_path_factory):
    """Gateway: TLS port (proxy environment), bearer tokens (file), TLS required; experts: mTLS."""
    model = small_model(tmp_path_factory.mktemp("small"))
    tokens = pki["dir"] / "tokens"
    tokens.write_text("# current and previous\ntoken-2025\ntoken-2024\n")
    cert, key = pki["gateway"]
    tls_port = free_port()
    env = {security.TLS_CERT_ENV: cert, security.TLS_KEY_ENV: key, security.TLS_PORT_ENV: str(tls_port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: Ray's processes, Serve's proxy among them, inherit it
    try:
        with running_app(model, edit=experts(2), auth_token_file=str(tokens), require_tls=True,
                         expert_tls=expert_tls(pki)) as (address, _):
            yield {"plain": address, "tls": f"localhost:{tls_port}", "model": model}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.cluster
def test_gateway_tls_and_bearer_tokens(secured, pki):
    prompt, params = [5, 6, 7, 8], SamplingParams(max_new_tokens=6)
    want, _ = run(local_engine(secured["model"]).complete(prompt, params))
    req = client.request(prompt, None, params)

    def complete(address, ca, token, method="Complete"):
        with client.channel(address, ca=ca, token=token) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            if method == "Generate":
                return call(lambda r, timeout: list(stub.Generate(r, timeout=timeout)), req, timeout=60)
            return call(getattr(stub, method), req, timeout=60)

    ca, tls = pki["ca"].path, secured["tls"]
    # The first call after deployment can meet replicas still settling (UNAVAILABLE); allow that once.
    wait_until(lambda: complete(tls, ca, "token-2025")[0] == OK, 30, "the TLS gateway answers", every_s=1.0)
    for token in ("token-2025", "token-2024"):  # either of the configured tokens
        code, _, reply = complete(tls, ca, token)
        assert code == OK and list(reply.token_ids) == want  # also proves router -> expert mTLS works
    for token, words in (("", "missing credentials"), ("token-2023", "invalid bearer token")):
        for method in ("Complete", "Generate"):
            code, _, details = complete(tls, ca, token, method)
            assert code == UNAUTHENTICATED and words in details
    with client.channel(tls, ca=ca, token="") as ch:
        assert call(gateway_pb2_grpc.GatewayStub(ch).Stats, gateway_pb2.StatsRequest(), timeout=30)[0] \
            == UNAUTHENTICATED
    # the handshake fails without the right CA; plaintext does not speak to the TLS port
    for wrong_ca in (pki["stranger"].path, ""):
        code, _, details = complete(tls, wrong_ca, "token-2025")
        assert code == UNAVAILABLE
    # the plaintext port still answers, but TLS is required for anything but health
    code, _, details = complete(secured["plain"], "", "token-2025")
    assert code == UNAUTHENTICATED and "TLS" in details
    assert client.healthy(secured["plain"], ca="", token="")
    assert client.healthy(tls, ca=ca, token="")


@pytest.mark.cluster
def test_expert_data_plane_is_node_local_and_needs_a_client_certificate(secured, pki):
    table = directory_table()
    addresses = [a for rs in table.values() for a in rs]
    assert len(addresses) == 2
    node_ip = ray.util.get_node_ip_address()
    assert all(a.rsplit(":", 1)[0] == node_ip for a in addresses)  # the node's address, not 0.0.0.0
    tls = expert_tls(pki)
    options = client.OPTIONS + security.expert_channel_options(tls)

    async def info(address, creds):
        async with BytesChannel(address, options=options, credentials=creds) as c:
            try:
                return (await c.info(timeout=10)).hidden_size
            except grpc.aio.AioRpcError as e:
                return e.code()

    for a in addresses:
        assert run(info(a, None)) == UNAVAILABLE
        assert run(info(a, grpc.ssl_channel_credentials(open(pki["ca"].path, "rb").read()))) == UNAVAILABLE
        assert run(info(a, security.expert_channel_credentials(tls))) == 64


@pytest.mark.cluster
def test_ray_token_authentication_stays_on(secured):
    """The cluster's own control plane (GCS) refuses calls without its token."""
    from ray._raylet import AuthenticationMode, get_authentication_mode
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    token = os.environ.get("RAY_AUTH_TOKEN") or Path(
        os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).read_text().strip()
    with grpc.insecure_channel(ray.get_runtime_context().gcs_address) as ch:
        nodes = ch.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")  # empty request: all nodes
        for metadata in ([], [("authorization", "Bearer not-the-cluster-token")]):
            code, _, details = call(nodes, b"", metadata=metadata, timeout=30)
            assert code == UNAUTHENTICATED and "token" in details.lower()
        assert call(nodes, b"", metadata=[("authorization", f"Bearer {token}")], timeout=30)[0] == OK
