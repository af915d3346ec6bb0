"""RouterClient against an in-process fake of the Router's Serve handle, no Ray cluster: liveness
(a call no router replica takes fails fast, and the watcher reads replica states), failover (a
generation whose replica dies is replayed or continued on another one), deadlines, and Ray's errors
named as the service's own."""
from __future__ import annotations

import asyncio
import time
import types

import pytest
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from router_service.engine import Overloaded
from router_service.gateway import router_client
from router_service.gateway.router_client import RouterClient, RouterUnavailable, service_error
from router_service.sampling import SamplingParams
from tests.conftest import run

GREEDY, SEEDED, SAMPLED = SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=0.8, seed=3), \
    SamplingParams(max_new_tokens=12, temperature=0.8)


def next_token(prefix: list[int]) -> int:
    """The fake router's token after `prefix`: a function of the prefix alone, like greedy decoding."""
    return (sum(prefix) * 31 + len(prefix)) % 101


def unbroken(prompt: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(next_token(prompt + out))
    return out


class Response:
    """A handle call's response: taken by a replica once `taken` is set; then `items` (streaming,
    `error` raised after them) or `result`."""

    def __init__(self, items=(), result=None, error: BaseException | None = None, taken: bool = True):
        self.items, self.result, self.error = list(items), result, error
        self.taken = asyncio.Event()
        if taken:
            self.taken.set()
        self.cancelled = False

    async def _to_object_ref_gen(self):
        await self.taken.wait()

    _to_object_ref = _to_object_ref_gen

    def cancel(self):
        self.cancelled = True

    async def __aiter__(self):
        for item in self.items:
            await asyncio.sleep(0)
            yield item
        if self.error is not None:
            raise self.error

    def __await__(self):
        async def result():
            if self.error is not None:
                raise self.error
            return self.result
        return result().__await__()


class Handle:
    """The Router's handle: each generate call goes to the next replica of `replicas`, the last one
    taking every call after. A replica is the number of tokens it sends before it dies (None: it
    does not), or a callable (prompt, params) -> Response."""
    app_name, deployment_name = "moe", "Router"

    def __init__(self, *replicas):
        self.replicas, self.calls, self.responses = list(replicas), [], []
        self.generate = types.SimpleNamespace(remote=self._generate)
        self.score = types.SimpleNamespace(remote=lambda ids, timeout_s: self._keep(Response(result=len(ids))))

    def options(self, stream: bool = False):
        return self

    def _keep(self, response: Response) -> Response:
        self.responses.append(response)
        return response

    def _generate(self, prompt, params: dict, timeout_s: float) -> Response:
        self.calls.append((list(prompt), dict(params), timeout_s))
        replica = self.replicas.pop(0) if len(self.replicas) > 1 else self.replicas[0]
        if callable(replica):
            return self._keep(replica(prompt, params))
        tokens = unbroken(list(prompt), params["max_new_tokens"])
        items = [(t, "length" if i == len(tokens) - 1 else None) for i, t in enumerate(tokens)]
        if replica is None:
            return self._keep(Response(items))
        return self._keep(Response(items[:replica], error=RayActorError()))


def status_of(*running: int):
    """A stand-in for serve.status(): the router's RUNNING replicas, one count per look (the last repeats)."""
    looks = list(running)

    def status():
        n = looks.pop(0) if len(looks) > 1 else looks[0]
        dep = types.SimpleNamespace(replica_states={"RUNNING": n} if n else {"STARTING": 1}, status="UPDATING",
                                    message="")
        return types.SimpleNamespace(applications={"moe": types.SimpleNamespace(deployments={"Router": dep})})
    return status


def client(handle, *running, **kw) -> RouterClient:
    return RouterClient(handle, status=status_of(*(running or (1,))), **kw)


async def collect(c: RouterClient, ids, params):
    return [t async for t in c.tokens(ids, params)]


@pytest.fixture(autouse=True)
def fast_watch(monkeypatch):
    monkeypatch.setattr(router_client, "WATCH_PERIOD_S", 0.02)
    monkeypatch.setattr(router_client, "ROUTER_GRACE_S", 0.1)
    monkeypatch.setattr(router_client, "WAIT_STEP_S", 0.02)


# -- failover --------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [GREEDY, SEEDED])
def test_a_replayed_generation_skips_the_tokens_already_sent(params):
    """Greedy and seeded: replayed from the prompt on the next replica, the tokens sent checked
    and skipped; the caller sees every token once."""
    handle = Handle(5, 2, None)  # dies after 5 tokens, then after 2 of the replay, then runs through
    c = client(handle)
    got = run(collect(c, [1, 2, 3], params))
    assert [t for t, _ in got] == unbroken([1, 2, 3], 12) and got[-1][1] == "length"
    assert c.resumed == 2
    assert [call[0] for call in handle.calls] == [[1, 2, 3]] * 3
    assert all(call[1]["max_new_tokens"] == 12 for call in handle.calls)
    assert all(r.cancelled for r in handle.responses[:2])


def test_a_sampled_generation_continues_from_the_tokens_sent():
    handle = Handle(4, None)
    c = client(handle)
    got = run(collect(c, [7, 8], SAMPLED))
    want = unbroken([7, 8], 12)
    assert [t for t, _ in got] == want and c.resumed == 1
    (first, _, _), (second, params, _) = handle.calls
    assert first == [7, 8] and second == [7, 8] + want[:4] and params["max_new_tokens"] == 8


def test_a_replay_that_diverges_or_ends_early_is_unavailable():
    def other(prompt, params):  # a replica whose tokens differ from the first one's
        return Response([(99, None)] * params["max_new_tokens"])

    def short(prompt, params):
        return Response([(unbroken(list(prompt), 1)[0], "stop")])
    for second, words in ((other, "diverged"), (short, "ended early")):
        with pytest.raises(RouterUnavailable, match=words):
            run(collect(client(Handle(3, second)), [1, 2, 3], GREEDY))


def test_resumes_stop_at_max_resumes_and_at_the_deadline():
    handle = Handle(1)  # every replica dies after one token
    c = client(handle)
    with pytest.raises(RayActorError):
        run(collect(c, [1], GREEDY))
    assert c.resumed == router_client.MAX_RESUMES and len(handle.calls) == router_client.MAX_RESUMES + 1
    c = client(Handle(1), request_timeout_s=0.0)  # no time left: no resume
    with pytest.raises(RayActorError):
        run(collect(c, [1], GREEDY))
    assert c.resumed == 0


def test_only_a_lost_replica_is_resumed():
    def refusing(prompt, params):
        return Response(error=RayTaskError("generate", "Traceback", ValueError("bad")).as_instanceof_cause())
    c = client(Handle(refusing, None))
    with pytest.raises(ValueError):
        run(collect(c, [1], GREEDY))
    assert c.resumed == 0
    # an unreachable replica (ActorUnavailableError) is resumed like a dead one
    lost = Handle(lambda p, s: Response([(next_token(list(p)), None)], error=ActorUnavailableError("gone", None)), None)
    assert [t for t, _ in run(collect(client(lost), [4], GREEDY))] == unbroken([4], 12)


def test_a_replica_lost_after_the_last_token_is_not_resumed():
    def last_then_dies(prompt, params):
        tokens = unbroken(list(prompt), params["max_new_tokens"])
        return Response([(t, "length" if i == len(tokens) - 1 else None) for i, t in enumerate(tokens)],
                        error=RayActorError())
    handle = Handle(last_then_dies)
    c = client(handle)
    assert len(run(collect(c, [2], GREEDY))) == 12 and c.resumed == 0 and len(handle.calls) == 1


def test_the_deadline_goes_to_the_router_and_shrinks_on_resume():
    handle = Handle(3, None)
    run(collect(client(handle, request_timeout_s=50.0), [1], GREEDY))
    first, second = handle.calls[0][2], handle.calls[1][2]
    assert 49 < first <= 50 and second <= first


# -- liveness --------------------------------------------------------------------------------------

def test_a_call_no_replica_takes_fails_fast_when_the_router_has_none():
    handle = Handle(lambda p, s: Response(taken=False))
    c = client(handle, 0)
    t = time.monotonic()
    with pytest.raises(RouterUnavailable, match="no running replica"):
        run(collect(c, [1], GREEDY))
    assert time.monotonic() - t < 2 and c.replicas == 0
    assert handle.responses[0].cancelled


def test_a_call_waits_wait_s_while_replicas_run():
    handle = Handle(lambda p, s: Response(taken=False))
    c = client(handle, 1, wait_s=0.3)
    t = time.monotonic()
    with pytest.raises(RouterUnavailable, match="no replica took the call"):
        run(collect(c, [1], GREEDY))
    assert 0.3 <= time.monotonic() - t < 2 and c.replicas == 1


def test_a_call_taken_late_is_served():
    async def go():
        response = Response([(5, "length")], taken=False)
        c = client(Handle(lambda p, s: response), 1)
        asyncio.get_running_loop().call_later(0.3, response.taken.set)
        return await collect(c, [1], SamplingParams(max_new_tokens=1))
    assert run(go()) == [(5, "length")]


def test_the_watcher_says_zero_only_when_two_looks_agree():
    """Looks of 2, 0, 0 running replicas while a call waits: after the second look it still says 2,
    after the third 0, and the call fails."""
    looks, said = status_of(2, 0, 0), []
    c = RouterClient(Handle(lambda p, s: Response(taken=False)), status=lambda: said.append(c.replicas) or looks())
    with pytest.raises(RouterUnavailable, match="no running replica"):
        run(collect(c, [1], GREEDY))
    assert said[:4] == [None, 2, 2, 0]


def test_calls_taken_at_once_never_look_and_the_watcher_stops(monkeypatch):
    """serve.status() is not free: a call taken at once costs no look; after a call that waited,
    the watcher looks for WATCH_LINGER_S (calls taken at once meanwhile do not extend it), then
    stops, the replica count unknown again."""
    monkeypatch.setattr(router_client, "WATCH_LINGER_S", 0.3)
    looks = []
    status = status_of(1)
    c = RouterClient(Handle(None), status=lambda: looks.append(1) or status())

    async def go():
        for _ in range(20):
            await c.score([1])
        assert looks == [] and c.replicas is None
        response = Response([(5, "length")], taken=False)
        c.handle = Handle(lambda p, s: response)
        asyncio.get_running_loop().call_later(0.3, response.taken.set)
        assert await collect(c, [1], SamplingParams(max_new_tokens=1)) == [(5, "length")]
        assert looks and c.replicas == 1
        c.handle = Handle(None)
        until = asyncio.get_running_loop().time() + 0.6
        while asyncio.get_running_loop().time() < until:  # calls taken at once do not keep it looking
            await c.score([1])
            await asyncio.sleep(0.01)
        assert c._watcher.done()
    run(go())
    assert c.replicas is None


def test_a_controller_that_does_not_answer_keeps_the_last_answer():
    looks = []

    def status():
        looks.append(1)
        if len(looks) > 1:
            raise ConnectionError("controller restarting")
        return status_of(1)()

    async def go():
        c = RouterClient(Handle(lambda p, s: Response(taken=False)), status=status, wait_s=0.5)
        call = asyncio.ensure_future(collect(c, [1], GREEDY))
        await asyncio.sleep(0.3)
        replicas = c.replicas
        with pytest.raises(RouterUnavailable, match="no replica took the call"):
            await call
        return replicas
    assert run(go()) == 1 and len(looks) > 1


def test_unary_calls_fail_fast_and_are_cancelled_too():
    handle = Handle(None)
    handle.score = types.SimpleNamespace(remote=lambda ids, timeout_s: handle._keep(Response(taken=False)))
    with pytest.raises(RouterUnavailable):
        run(client(handle, 0).score([1, 2]))
    assert handle.responses[0].cancelled


def test_serving_needs_every_shard_live_and_a_router():
    def ready_handle(response):
        h = Handle(None)
        h.ready = types.SimpleNamespace(remote=lambda: response)
        return h
    assert run(client(ready_handle(Response(result={"expert-0": 1, "expert-1": 2}))).serving()) is True
    assert run(client(ready_handle(Response(result={"expert-0": 1, "expert-1": 0}))).serving()) is False
    assert run(client(ready_handle(Response(error=RayActorError()))).serving()) is False


# -- errors ----------------------------------------------------------------------------------------

def _ray_wrapped(cause):
    return RayTaskError("generate", "Traceback (most recent call last):\n  secret frame", cause).as_instanceof_cause()


@pytest.mark.parametrize("error, kind, words", [
    (BackPressureError(num_queued_requests=5, max_queued_requests=5), Overloaded, "too many requests queued"),
    (RayActorError(), RouterUnavailable, "router unavailable"),
    (ActorUnavailableError("gone", None), RouterUnavailable, "router unavailable"),
    (DeploymentUnavailableError("Router"), RouterUnavailable, "router unavailable"),
    (RequestCancelledError("id"), asyncio.CancelledError, ""),
    (Overloaded("9 requests in flight"), Overloaded, "9 requests"),
    (ValueError("token id 9999"), ValueError, "9999"),
    (KeyError("internal"), KeyError, "internal"),
])
def test_service_error_names_rays_errors(error, kind, words):
    for e in (error, _ray_wrapped(error)):
        got = service_error(e)
        assert isinstance(got, kind) and words in str(got) and "Traceback" not in str(got)
