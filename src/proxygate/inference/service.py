"""The inference plane: admission, queue, dispatch to workers, token streams.

`InferenceService.stream()` is an async generator of the worker's
TokenResponse messages for one validated request. Before the first token it
may still raise an `HttpError` (the API answers with a status); after it, a
failure raises `GenerationFailed` (the API ends the stream with an error
event). A worker that fails before the first token is excluded and the
request goes back to the head of its queue for another worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import grpc

from .._pb import inference_pb2
from ..errors import BadGateway, GatewayTimeout, NotFound, ServiceUnavailable
from .metrics import InferenceMetrics
from .queue import ANY_MODEL, RequestQueue, Ticket
from .scheduler import assign
from .workers import WorkerClient, WorkerPool

log = logging.getLogger("proxygate.inference")

DEFAULT_MODEL = "default-model"


@dataclass(frozen=True, slots=True)
class InferenceLimits:
    max_queue: int = 1000
    queue_timeout: float = 30.0
    inference_timeout: float = 300.0
    health_interval: float = 1.0
    health_timeout: float = 1.0
    eject_after: int = 3


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt: str
    model: str = DEFAULT_MODEL
    max_tokens: int = 100
    temperature: float = 0.7
    priority: int = 1
    stop: list[str] = field(default_factory=list)
    top_p: float = 0.0
    seed: int | None = None
    raw_prompt: bool = False
    messages: list[tuple[str, str]] = field(default_factory=list)

    def to_proto(self) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(
            request_id=self.request_id,
            model=self.model,
            prompt=self.prompt,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            priority=self.priority,
            stop=self.stop,
            top_p=self.top_p,
            seed=self.seed or 0,
            has_seed=self.seed is not None,
            raw_prompt=self.raw_prompt,
            messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in self.messages],
        )


class GenerationFailed(Exception):
    """A generation failed after its first token was sent."""


def priority_label(priority: int) -> str:
    return "high" if priority >= 8 else "medium" if priority >= 4 else "low"


def queue_key(model: str) -> str:
    return ANY_MODEL if model in ("", DEFAULT_MODEL) else model


class InferenceService:
    def __init__(self, worker_addrs: tuple[str, ...], limits: InferenceLimits, metrics: InferenceMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.queue = RequestQueue(limits.max_queue)
        self.pool = WorkerPool(
            worker_addrs, self.schedule, limits.health_interval, limits.health_timeout, limits.eject_after
        )
        self.accepting = True
        self.in_flight = 0
        metrics.track_workers(self.pool.workers)

    @property
    def configured(self) -> bool:
        return bool(self.pool.workers)

    def start(self) -> None:
        self.pool.start()

    async def aclose(self) -> None:
        self.accepting = False
        await self.pool.aclose()

    # ---- scheduling ------------------------------------------------------------

    def schedule(self) -> None:
        for ticket, worker in assign(self.queue, self.pool.workers):
            waiter: asyncio.Future[WorkerClient] = ticket.payload
            if waiter.done():  # its client left between queueing and now
                worker.active -= 1
                continue
            waiter.set_result(worker)  # type: ignore[arg-type]
        self.metrics.queue_depth.set(len(self.queue))

    def _release(self, worker: WorkerClient) -> None:
        worker.active -= 1
        self.schedule()

    # ---- admission -------------------------------------------------------------

    def admit(self, req: GenerationRequest) -> None:
        """Refuse before queueing: 503 when we cannot serve soon, 404 for an unknown model."""
        if not self.accepting:
            raise ServiceUnavailable("shutting down", headers=[(b"Retry-After", b"5")])
        if not self.pool.workers:
            raise ServiceUnavailable(
                "no inference workers configured (-worker-addrs)", headers=[(b"Retry-After", b"30")]
            )
        if not any(w.available for w in self.pool.workers):
            raise ServiceUnavailable("no healthy inference workers", headers=[(b"Retry-After", b"5")])
        key = queue_key(req.model)
        if key and not self.pool.has_wildcard() and key not in self.pool.models():
            available = ", ".join(sorted(self.pool.models())) or "none"
            raise NotFound(f"model {req.model!r} not found; available: {available}")
        if self.queue.full:
            raise ServiceUnavailable("inference queue is full", headers=[(b"Retry-After", b"2")])

    async def _wait_for_worker(self, ticket: Ticket, deadline: float, retry: bool) -> WorkerClient:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WorkerClient] = loop.create_future()
        ticket.payload = waiter
        self.queue.push(ticket, keep_seq=retry)
        self.schedule()
        timeout = min(self.limits.queue_timeout or deadline, deadline - loop.time())
        try:
            return await asyncio.wait_for(waiter, max(0.0, timeout))
        except asyncio.TimeoutError:
            self.queue.remove(ticket)
            self.metrics.queue_depth.set(len(self.queue))
            raise ServiceUnavailable("timed out waiting for a worker", headers=[(b"Retry-After", b"2")]) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            self.queue.remove(ticket)
            self.metrics.queue_depth.set(len(self.queue))
            raise

    # ---- one generation -------------------------------------------------------

    async def stream(self, req: GenerationRequest) -> AsyncGenerator[inference_pb2.TokenResponse, None]:
        self.admit(req)
        loop = asyncio.get_running_loop()
        m = self.metrics
        model_label = m.model_label(req.model)
        prio = priority_label(req.priority)
        deadline = loop.time() + (self.limits.inference_timeout or 1e9)
        ticket = Ticket(model=queue_key(req.model), priority=req.priority)
        submitted = time.perf_counter()
        status = "error"
        tokens = 0
        prompt_tokens = cached_tokens = 0
        first_token_at: float | None = None
        self.in_flight += 1
        m.in_flight.set(self.in_flight)
        message = req.to_proto()
        retry = False
        try:
            while True:
                worker = await self._wait_for_worker(ticket, deadline, retry)
                dispatched = time.perf_counter()
                if not retry:
                    m.queue_wait.labels(model_label, prio).observe(dispatched - submitted)
                worker_status = "error"
                call = worker.stub.Generate(message, timeout=max(0.001, deadline - loop.time()))
                try:
                    async for resp in call:
                        if resp.error:
                            worker_status = "error"
                            if first_token_at is None:
                                raise BadGateway(f"generation failed: {_one_line(resp.error)}")
                            raise GenerationFailed(_one_line(resp.error))
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                            m.ttft.labels(model_label).observe(first_token_at - submitted)
                        tokens = resp.token_count or tokens + (1 if resp.token else 0)
                        if resp.prompt_tokens:
                            prompt_tokens, cached_tokens = resp.prompt_tokens, resp.cached_tokens
                        yield resp
                        if resp.finished:
                            worker_status = "success"
                            status = "success"
                            return
                    raise GenerationFailed("worker ended the stream without finishing")
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        worker_status = status = "timeout"
                        if first_token_at is None:
                            raise GatewayTimeout("inference timed out") from None
                        raise GenerationFailed("inference timed out") from None
                    if code == grpc.StatusCode.UNAVAILABLE and worker.eject_now(exc.details() or "unavailable"):
                        self.schedule()
                    else:
                        worker.record_failure(f"{code.name}: {exc.details()}")
                    if first_token_at is not None:
                        raise GenerationFailed(f"worker {worker.id} failed: {code.name}") from None
                    # Nothing reached the client yet: try another worker.
                    ticket.excluded.add(worker.id)
                    if not any(w.serves(ticket.model) and w.id not in ticket.excluded for w in self.pool.workers):
                        raise ServiceUnavailable(
                            f"inference workers failed: {code.name}", headers=[(b"Retry-After", b"2")]
                        ) from None
                    log.info(
                        "request %s: worker %s failed before the first token (%s); retrying",
                        req.request_id,
                        worker.id,
                        code.name,
                    )
                    retry = True
                finally:
                    call.cancel()
                    m.processing.labels(model_label, worker.id).observe(time.perf_counter() - dispatched)
                    m.worker_requests.labels(worker.id, worker_status).inc()
                    self._release(worker)
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            self.in_flight -= 1
            m.in_flight.set(self.in_flight)
            m.requests.labels(model_label, prio, status).inc()
            m.duration.labels(model_label).observe(time.perf_counter() - submitted)
            if tokens:
                m.tokens.labels(model_label).inc(tokens)
            if prompt_tokens:
                m.prompt_tokens.labels(model_label).inc(prompt_tokens)
                m.cached_tokens.labels(model_label).inc(cached_tokens)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]
