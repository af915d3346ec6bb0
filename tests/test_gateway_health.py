"""Gateway health Checks come from a cached state: a flood of them costs one router look per
HEALTH_TTL_S, not one per Check."""
import asyncio

from grpc_health.v1 import health_pb2

from router_service.gateway import GrpcGateway, RouterClient
from router_service.gateway.router_client import HEALTH_TTL_S


class _Router:
    class _Ready:
        def __init__(self, router):
            self.router = router

        def remote(self):
            self.router.looks += 1
            return None

    def __init__(self):
        self.looks = 0
        self.ready = self._Ready(self)


def _gateway(ready: dict):
    g = object.__new__(GrpcGateway)
    g.max_request_bytes = 1 << 20
    g.client = RouterClient(_Router(), wait_s=30.0)

    async def unary(_response, _wait_s=None):
        await asyncio.sleep(0.05)  # a router call takes a while
        return ready
    g.client._unary = unary
    return g


class _Ctx:
    pass


def test_a_check_flood_makes_one_router_call_per_ttl():
    async def go():
        g = _gateway({"expert-0": 1, "expert-1": 1})
        replies = await asyncio.gather(*(g.Check(health_pb2.HealthCheckRequest(), _Ctx()) for _ in range(500)))
        assert {r.status for r in replies} == {health_pb2.HealthCheckResponse.SERVING}
        assert g.client.handle.looks == 1
        g.client._serving_at -= HEALTH_TTL_S  # the state is old: the next Check starts one new look
        await asyncio.gather(*(g.Check(health_pb2.HealthCheckRequest(), _Ctx()) for _ in range(100)))
        assert g.client.handle.looks == 2
        gone = _gateway({"expert-0": 0})
        assert (await gone.Check(health_pb2.HealthCheckRequest(), _Ctx())).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    asyncio.run(go())


def test_a_client_past_its_share_of_requests_is_refused_while_others_are_served():
    """max_requests_per_client: one caller's further requests get RESOURCE_EXHAUSTED while it holds
    its share; another caller (another token, or another host) is served; the share comes back
    when a request ends, however it ends."""
    import grpc
    import pytest

    from router_service.gateway.admission import ClientShare, client_id
    from router_service.validation import RequestError
    share = ClientShare(2)
    a = client_id([("authorization", "Bearer token-a")], "ipv4:10.0.0.1:5000", [b"token-a", b"token-b"])
    b = client_id([("authorization", "Bearer token-b")], "ipv4:10.0.0.1:5001", [b"token-a", b"token-b"])
    assert a != b and "token-a" not in a  # a digest, not the token
    assert client_id([], "ipv4:10.0.0.1:5000", []) == client_id([], "ipv4:10.0.0.1:6000", []) == "host:10.0.0.1"
    with share.hold(a), share.hold(a):
        with pytest.raises(RequestError) as refused:
            with share.hold(a):
                pass
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_requests_per_client" in \
            refused.value.message
        with share.hold(b):
            assert share.held == {a: 2, b: 1}
    with pytest.raises(ZeroDivisionError):
        with share.hold(a):
            1 / 0
    assert not share.held  # every slot back, also after a failure
