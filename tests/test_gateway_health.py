"""Gateway health Checks come from a cached state: a flood of them costs one router look per
HEALTH_TTL_S, not one per Check."""
import asyncio

from grpc_health.v1 import health_pb2

from router_service import gateway


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
    g = object.__new__(gateway.Gateway.func_or_class)
    g.router, g.router_wait_s, g.max_request_bytes = _Router(), 30.0, 1 << 20
    g._serving, g._serving_at, g._health_look = None, 0.0, None

    async def unary(_response, _wait_s=None):
        await asyncio.sleep(0.05)  # a router call takes a while
        return ready
    g._unary = unary
    return g


class _Ctx:
    pass


def test_a_check_flood_makes_one_router_call_per_ttl():
    async def go():
        g = _gateway({"expert-0": 1, "expert-1": 1})
        replies = await asyncio.gather(*(g.Check(health_pb2.HealthCheckRequest(), _Ctx()) for _ in range(500)))
        assert {r.status for r in replies} == {health_pb2.HealthCheckResponse.SERVING}
        assert g.router.looks == 1
        g._serving_at -= gateway.HEALTH_TTL_S  # the state is old: the next Check starts one new look
        await asyncio.gather(*(g.Check(health_pb2.HealthCheckRequest(), _Ctx()) for _ in range(100)))
        assert g.router.looks == 2
        gone = _gateway({"expert-0": 0})
        assert (await gone.Check(health_pb2.HealthCheckRequest(), _Ctx())).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    asyncio.run(go())
