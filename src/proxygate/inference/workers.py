"""The gateway's view of its gRPC workers: channels, health, capacity, load.

Each `WorkerClient` owns one gRPC channel (`rpc.channel`: HTTP/2 on the event
loop, one connection per worker). A health loop polls every
worker's Health RPC; a worker that fails `eject_after` polls in a row is
ejected (no new work), and re-admitted on its next healthy answer. Capacity
and models come from the Health extensions; a seed-built worker reports
neither and counts as capacity 1, serving any model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from .._pb import inference_pb2
from ..rpc.channel import Call, Channel, RpcError

log = logging.getLogger("proxygate.workers")

_GENERATE = "/inference.ModelService/Generate"
_HEALTH = "/inference.ModelService/Health"
# A connection that answers no PING for this long is dropped (a worker host gone
# without closing it); checked when a Health poll times out.
PROBE_TIMEOUT = 20.0


class WorkerClient:
    def __init__(self, addr: str, eject_after: int = 3) -> None:
        self.addr = addr
        self.id = addr
        self.channel = Channel(addr)
        self.eject_after = eject_after
        self.healthy = False
        self.ready = False
        self.models: frozenset[str] | None = None  # None: serves any model
        self.capacity = 1
        self.active = 0
        self.failures = 0
        self.engine = ""
        self.last_health: inference_pb2.HealthResponse | None = None  # prefix cache figures and the like

    def generate(self, request: bytes, timeout: float) -> Call[inference_pb2.TokenResponse]:
        """Start a Generate call with a serialized GenerateRequest."""
        return self.channel.unary_stream(_GENERATE, request, inference_pb2.TokenResponse.FromString, timeout)

    async def health(self, timeout: float) -> inference_pb2.HealthResponse:
        return await self.channel.unary_unary(_HEALTH, b"", inference_pb2.HealthResponse.FromString, timeout)

    @property
    def available(self) -> bool:
        return self.healthy and self.ready

    @property
    def free_slots(self) -> int:
        return self.capacity - self.active if self.available else 0

    @property
    def only_model(self) -> str | None:
        """The model this worker serves when it reports exactly one."""
        if self.models is not None and len(self.models) == 1:
            return next(iter(self.models))
        return None

    def serves(self, model: str) -> bool:
        return self.models is None or not model or model in self.models

    def record_health(self, resp: inference_pb2.HealthResponse) -> bool:
        """Apply a Health answer; whether availability changed."""
        before = self.available
        self.failures = 0
        self.healthy = resp.healthy
        # A seed worker knows no `ready`; its answering healthy means ready.
        self.ready = resp.ready or not resp.engine
        self.models = frozenset(resp.models) if resp.models else None
        self.capacity = max(1, resp.max_concurrency)
        self.engine = resp.engine
        self.last_health = resp
        return before != self.available

    def record_failure(self, why: str) -> bool:
        """A failed poll or call; whether the worker was ejected by it."""
        self.failures += 1
        if self.healthy and self.failures >= self.eject_after:
            self.healthy = False
            log.warning("worker %s ejected after %d failures: %s", self.addr, self.failures, why)
            return True
        return False

    def eject_now(self, why: str) -> bool:
        """The worker is unreachable for certain (its call failed UNAVAILABLE)."""
        if not self.healthy:
            return False
        self.healthy = False
        self.failures = max(self.failures, self.eject_after)
        log.warning("worker %s ejected: %s", self.addr, why)
        return True

    async def aclose(self) -> None:
        await self.channel.close()


class WorkerPool:
    def __init__(
        self,
        addrs: tuple[str, ...],
        on_change: Callable[[], None],
        interval: float = 1.0,
        timeout: float = 1.0,
        eject_after: int = 3,
    ) -> None:
        self.workers = [WorkerClient(a, eject_after) for a in addrs]
        self.on_change = on_change
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.workers and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._health_loop())

    async def poll_once(self) -> None:
        changed = await asyncio.gather(*(self._poll(w) for w in self.workers))
        if any(changed):
            self.on_change()

    async def _poll(self, worker: WorkerClient) -> bool:
        try:
            resp = await worker.health(self.timeout)
        except RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                worker.channel.probe(PROBE_TIMEOUT)
            return worker.record_failure(f"{exc.code().name}: {exc.details()}")
        changed = worker.record_health(resp)
        if changed and worker.available:
            log.info(
                "worker %s available: capacity %d, models %s",
                worker.addr,
                worker.capacity,
                ",".join(sorted(worker.models)) if worker.models else "any",
            )
        return changed

    async def _health_loop(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)

    def models(self) -> set[str]:
        out: set[str] = set()
        for w in self.workers:
            if w.models:
                out |= w.models
        return out

    def has_wildcard(self) -> bool:
        return any(w.models is None for w in self.workers)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(w.aclose() for w in self.workers), return_exceptions=True)
