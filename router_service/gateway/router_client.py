"""The gateway's calls to the Router deployment, through its Serve handle (both fronts share one).

RouterClient owns everything about talking to the router:
- liveness: while a call waits for a router replica to take it (and WATCH_LINGER_S after), a
  watcher follows the router's running replicas in `serve.status()`; a call no replica takes fails
  within a second or two with RouterUnavailable instead of waiting, as Serve would, until a new
  replica is up (minutes, for a big model). Calls taken at once (the usual case) cost no look:
  `serve.status()` pickles every deployment's config, which costs a gateway real CPU if done often;
- failover: a generation whose router replica dies resumes on another one;
- deadlines: the request's time, handed to the router, and how long a call may wait to be taken;
- errors: the calls raise what Ray raised; `service_error` names it as one of the service's own.

Private Serve API, here alone: `_to_object_ref()` / `_to_object_ref_gen()` (see `_assigned`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from router_service.engine import Overloaded
from router_service.sampling import SamplingParams

log = logging.getLogger("ray.serve")

LIVE_STATES = ("RUNNING", "PENDING_MIGRATION")  # replica states in which a router replica takes calls
WATCH_PERIOD_S = 1.0  # between two looks at the router's replicas
WATCH_LINGER_S = 5.0  # how long the watcher goes on looking after the last call that had to wait
WAIT_STEP_S = 0.1  # a waiting call looks this often; one not taken in this time starts the watcher
ROUTER_GRACE_S = 1.0  # Serve's status can lag its routing: a call waits this long before "no replica" fails it
HEALTH_TTL_S = 1.0  # readiness is answered from a state at most this old (plus one look's time)
MAX_RESUMES = 3  # generations moved to another router replica, per request


class RouterUnavailable(RuntimeError):
    """No router replica took the call in time (dead, restarting, or not deployed)."""


def _cause(e: BaseException) -> BaseException:
    """Ray re-raises a router's exception as a RayTaskError subclass of the cause's class whose
    str() carries the remote traceback; the cause itself has just the message."""
    while isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None and e.cause is not e:
        e = e.cause
    return e


def service_error(e: BaseException) -> BaseException:
    """What a router call raised, as the service's own exception: the router's own (unwrapped from
    Ray's RayTaskError), Serve's back-pressure as Overloaded, a router Ray cannot reach as
    RouterUnavailable, Serve's cancellation as asyncio.CancelledError. Anything else (a fault of
    ours) is returned as it is."""
    e = _cause(e)
    if isinstance(e, BackPressureError):
        return Overloaded("too many requests queued")
    if isinstance(e, RequestCancelledError):
        return asyncio.CancelledError()
    if isinstance(e, (RayActorError, ActorUnavailableError, DeploymentUnavailableError)):
        return RouterUnavailable("router unavailable, retry shortly")
    return e


def _replica_lost(e: BaseException) -> bool:
    """The router replica serving the call died or became unreachable (another one may take over)."""
    return isinstance(_cause(e), (RayActorError, ActorUnavailableError))


def _assigned(response, streaming: bool) -> Awaitable:
    """Resolves once Serve has assigned the call to a router replica.

    Private Serve API (DeveloperAPI): a response's public face is its result (`await`) or its items
    (`async for`), and neither tells a call queued behind busy replicas from one that no replica
    will take; `_to_object_ref()` and `_to_object_ref_gen()` resolve at assignment. (Newer Ray's
    `DeploymentHandle.choose_replica` / `dispatch` mark the point too, but reserve a slot on the
    replica with a call of their own: another routing path.)"""
    return response._to_object_ref_gen() if streaming else response._to_object_ref()


class RouterClient:
    """Calls to the Router deployment behind `handle`, for one gateway replica.

    request_timeout_s: the time a request has in the router; wait_s: the most a call waits for a
    router replica to take it (under load that can take seconds, so it is generous). `status` is
    `serve.status` (tests pass their own)."""

    def __init__(self, handle: DeploymentHandle, *, request_timeout_s: float = 300.0, wait_s: float = 30.0,
                 status: Callable[[], Any] = serve.status):
        self.handle = handle
        self.timeout_s, self.wait_s = request_timeout_s, wait_s
        self._status = status
        self.replicas: int | None = None  # running router replicas; unknown while the watcher is not looking
        self._waited_at = float("-inf")  # when a call last waited to be taken
        self.resumed = 0  # generations moved to another router replica after theirs died
        self._watcher: asyncio.Task | None = None
        # Readiness from a cached state: a flood of health Checks costs one router call per HEALTH_TTL_S.
        self._serving: bool | None = None
        self._serving_at = 0.0
        self._health_look: asyncio.Task | None = None

    # -- calls -----------------------------------------------------------------------------------

    async def tokens(self, ids: list[int], params: SamplingParams) -> AsyncIterator[tuple[int, str | None]]:
        """(token, finish_reason or None) for one request, as the router makes them. Should the router
        replica generating them die, the generation resumes on another one (up to MAX_RESUMES
        times, within the request's time): greedy and seeded requests are replayed from the
        start, and the tokens already sent are checked and skipped (the engine's tokens do not
        depend on batching); others continue from the prompt plus the tokens sent. A caller that
        leaves early (cancelled, past its deadline, disconnected: Serve then cancels this call)
        or fails also stops the generation behind it; Ray does not pass that on by itself. The
        engine then drops the sequence and, if it was alone in its step, cancels the step's
        expert calls."""
        loop = asyncio.get_running_loop()
        deadline, sent, resumes, finished = loop.time() + self.timeout_s, [], 0, False
        replay = params.temperature == 0 or params.seed is not None
        while True:
            prompt, p = ids, params
            if sent and not replay:
                prompt, p = ids + sent, dataclasses.replace(params, max_new_tokens=params.max_new_tokens - len(sent))
            skip = list(sent) if replay else []
            stream = self.handle.options(stream=True).generate.remote(prompt, p.__dict__, deadline - loop.time())
            try:
                await self._taken(stream, streaming=True)
                async for token, reason in stream:
                    if skip:
                        if token != skip.pop(0):
                            raise RouterUnavailable("router unavailable (a resumed generation diverged), retry")
                        continue
                    sent.append(token)
                    finished = reason is not None
                    yield token, reason
                if skip:
                    raise RouterUnavailable("router unavailable (a resumed generation ended early), retry")
                return
            except Exception as e:
                stream.cancel()
                if finished:  # the caller has every token: nothing to resume
                    return
                if not _replica_lost(e) or resumes == MAX_RESUMES or loop.time() >= deadline:
                    raise
                resumes += 1
                self.resumed += 1
                log.warning("router replica lost mid-generation (%r); resuming after %d tokens", e, len(sent))
            except BaseException:
                stream.cancel()
                raise

    async def score(self, ids: list[int]) -> Any:
        """The router's logits for every position of `ids`."""
        return await self._unary(self.handle.score.remote(ids, self.timeout_s))

    async def stats(self) -> dict:
        """The router's counters (Stats)."""
        return await self._unary(self.handle.stats.remote())

    async def serving(self) -> bool:
        """Whether every expert shard has a live replica, as the router last said, from a state at
        most HEALTH_TTL_S old; one router call at a time answers every caller."""
        loop = asyncio.get_running_loop()
        if (self._health_look is None or self._health_look.done()) and loop.time() - self._serving_at >= HEALTH_TTL_S:
            self._health_look = loop.create_task(self._look_health())
        if self._serving is None:  # nothing known yet: wait for the first look
            await asyncio.shield(self._health_look)
        return bool(self._serving)

    async def _look_health(self) -> None:
        try:
            ready = await self._unary(self.handle.ready.remote(), min(self.wait_s, 4.0))
        except Exception:
            ready = {"router": 0}
        self._serving = all(n > 0 for n in ready.values())
        self._serving_at = asyncio.get_running_loop().time()

    # -- liveness --------------------------------------------------------------------------------

    async def _unary(self, response, wait_s: float | None = None):
        try:
            return await (await self._taken(response, streaming=False, wait_s=wait_s))
        except asyncio.CancelledError:
            response.cancel()
            raise

    async def _taken(self, response, *, streaming: bool, wait_s: float | None = None):
        """`response` once a router replica has taken its call. With none running (dead,
        restarting), fails after ROUTER_GRACE_S with RouterUnavailable, so callers can go elsewhere
        or retry; after `wait_s` (default: the client's) in any case. A call that fails here is
        cancelled."""
        loop = asyncio.get_running_loop()
        taken = asyncio.ensure_future(_assigned(response, streaming))
        start = loop.time()
        deadline = start + (wait_s or self.wait_s)
        try:
            while not taken.done():
                now = loop.time()
                if now - start >= WAIT_STEP_S:  # not taken at once: look at the router
                    self._waited_at = now
                    if self._watcher is None or self._watcher.done():
                        self._watcher = loop.create_task(self._watch())
                absent = self.replicas == 0 and now - start >= ROUTER_GRACE_S
                if absent or now >= deadline:
                    why = "no running replica" if absent else f"no replica took the call in {now - start:.0f}s"
                    raise RouterUnavailable(f"router unavailable ({why}), retry shortly")
                await asyncio.wait({taken}, timeout=min(WAIT_STEP_S, deadline - now))
            taken.result()
        except BaseException:
            taken.cancel()
            response.cancel()
            raise
        return response

    async def _watch(self) -> None:
        """Keeps `replicas` (running router replicas, as Serve's controller sees them) fresh while
        calls wait, and WATCH_LINGER_S after; then unknown (None) again. Zero only after two looks
        a period apart agree, so a replica passing between states is not taken for an absent
        router."""
        seen: list[int] = []
        loop = asyncio.get_running_loop()
        while loop.time() - self._waited_at < WATCH_LINGER_S:
            try:
                status = await asyncio.to_thread(self._status)
                dep = status.applications[self.handle.app_name].deployments[self.handle.deployment_name]
                states = dict(dep.replica_states)
                seen = (seen + [sum(states.get(s, 0) for s in LIVE_STATES)])[-2:]
                if max(seen) == 0 and self.replicas != 0:
                    log.warning("no running router replica: %s (%s) %s", states, dep.status, dep.message)
                self.replicas = max(seen)
            except Exception as e:  # the controller may be restarting: keep the last answer
                log.debug("router status unavailable: %r", e)
            await asyncio.sleep(WATCH_PERIOD_S)
        self.replicas = None
