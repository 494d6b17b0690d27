"""The inference plane: routing, admission, coalescing, queue, dispatch, token streams.

`InferenceService.stream()` is an async generator of the worker's
TokenResponse messages for one validated request. Before the first token it
may still raise an `HttpError` (the API answers with a status); after it, a
failure raises `GenerationFailed` (the API ends the stream with an error
event). A worker that fails before the first token is excluded and the
request goes back to the head of its queue for another worker.

Per request: the route table names the candidate models (`routes`); the first
candidate with a healthy worker and room in its queue is taken; an identical
deterministic request already in flight is joined instead of queued
(`coalesce`); otherwise the request waits in the priority queue until the
placement policy (`placement`) gives it a free worker.
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
from ..rpc.channel import Call, RpcError
from .coalesce import Coalescer, coalesce_key
from .metrics import InferenceMetrics
from .placement import Placement, PrefixAffinity, prompt_blocks
from .queue import ANY_MODEL, RequestQueue, Ticket
from .routes import RouteChoice, RoutesFile, estimate_tokens
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
    queue_aging: float = 30.0  # a waiting request gains a priority level per interval (0: never)
    token_timeout: float = 10.0  # a worker silent this long on a stream has stalled (0: never)


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
    max_tokens_explicit: bool = True  # False: max_tokens is the API's default
    tenant: str = ""  # the API key's name ("" without keys)
    client: str = ""  # the client's address: the tenant for fair share without keys
    weight: float = 1.0  # the tenant's share of the queue under contention
    # Set by the service: the route name asked for and the model that served it.
    route: str = ""
    served_model: str = ""
    fallbacks: tuple[str, ...] = ()  # the route's candidates after the one chosen

    def rule_text(self) -> str:
        """What routing patterns look at: the last user message, or the prompt."""
        for role, content in reversed(self.messages):
            if role == "user":
                return content
        return self.prompt

    def full_text(self) -> str:
        """The whole input as text: for token estimates and prefix digests."""
        if not self.messages:
            return self.prompt
        return "".join(f"{role}\x1f{content}\x1e" for role, content in self.messages)

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

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def priority_label(priority: int) -> str:
    return "high" if priority >= 8 else "medium" if priority >= 4 else "low"


def queue_key(model: str) -> str:
    return ANY_MODEL if model in ("", DEFAULT_MODEL) else model


def routing_head(req: GenerationRequest) -> bytes:
    """The response header lines that say how a request was routed."""
    return b"X-Proxygate-Route: %s\r\nX-Proxygate-Model: %s\r\n" % (
        _header_safe(req.route),
        _header_safe(req.served_model),
    )


_UNPRINTABLE = bytes(range(32)) + b"\x7f"


def _header_safe(text: str) -> bytes:
    """A client-chosen name as a header value: printable ASCII only."""
    return text.encode("ascii", "replace").translate(None, _UNPRINTABLE)[:256]


class InferenceService:
    def __init__(
        self,
        worker_addrs: tuple[str, ...],
        limits: InferenceLimits,
        metrics: InferenceMetrics,
        *,
        routes: RoutesFile | None = None,
        placement: Placement | None = None,
        coalesce: bool = True,
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.routes = routes or RoutesFile("")
        self.placement = placement or PrefixAffinity()
        self.coalescer = Coalescer() if coalesce else None
        self.queue = RequestQueue(limits.max_queue)
        self.pool = WorkerPool(
            worker_addrs, self.schedule, limits.health_interval, limits.health_timeout, limits.eject_after
        )
        self.accepting = True
        self.in_flight = 0
        self._aging: asyncio.Task[None] | None = None
        metrics.track_workers(self.pool.workers)

    @property
    def configured(self) -> bool:
        return bool(self.pool.workers)

    def start(self) -> None:
        self.pool.start()
        if self.limits.queue_aging > 0 and self._aging is None:
            self._aging = asyncio.get_running_loop().create_task(self._age_queue())

    async def _age_queue(self) -> None:
        """Once a second: waiting requests gain their aging levels (nothing starves)."""
        while True:
            await asyncio.sleep(min(1.0, self.limits.queue_aging))
            if self.queue.age(time.perf_counter(), self.limits.queue_aging):
                self.schedule()

    async def aclose(self) -> None:
        self.accepting = False
        if self._aging is not None:
            self._aging.cancel()
        await self.pool.aclose()

    # ---- scheduling ------------------------------------------------------------

    def schedule(self) -> None:
        for ticket, worker in assign(self.queue, self.pool.workers, self.placement):
            waiter: asyncio.Future[WorkerClient] = ticket.payload
            if waiter.done():  # its client left between queueing and now
                worker.active -= 1
                continue
            waiter.set_result(worker)  # type: ignore[arg-type]
        self.metrics.queue_depth.set(len(self.queue))

    def _release(self, worker: WorkerClient) -> None:
        worker.active -= 1
        self.schedule()

    # ---- routing and admission -------------------------------------------------

    def served_names(self) -> list[str]:
        """What /v1/models lists: route names, then the models workers serve."""
        names = self.routes.current.names()
        models = sorted(self.pool.models() - set(names))
        wildcard = self.pool.has_wildcard() or not (names or models)
        return ([DEFAULT_MODEL] if wildcard else []) + names + models

    def route(self, req: GenerationRequest) -> str:
        """Pick the model that will serve `req` (its queue key), or refuse.

        503 when we cannot serve soon, 404 for a name neither the route table
        nor any worker knows. Sets `req.route` and caps
        `req.max_tokens` at the route's limit.
        """
        if not self.accepting:
            raise ServiceUnavailable("shutting down", headers=[(b"Retry-After", b"5")])
        if not self.pool.workers:
            raise ServiceUnavailable(
                "no inference workers configured (-worker-addrs)", headers=[(b"Retry-After", b"30")]
            )
        if not any(w.available for w in self.pool.workers):
            raise ServiceUnavailable("no healthy inference workers", headers=[(b"Retry-After", b"5")])
        choice = self.routes.current.resolve(
            req.model, req.rule_text(), req.max_tokens if req.max_tokens_explicit else None
        )
        if choice is None:
            key = queue_key(req.model)
            if key and not self.pool.has_wildcard() and key not in self.pool.models():
                available = ", ".join(self.served_names()) or "none"
                raise NotFound(f"model {req.model!r} not found; available: {available}")
            choice = RouteChoice(req.model, (key,), "direct")
        if choice.max_tokens is not None:
            req.max_tokens = min(req.max_tokens, choice.max_tokens)
        req.route = choice.route
        full = False
        for index, model in enumerate(choice.candidates):
            if not any(w.available and w.serves(model) for w in self.pool.workers):
                continue
            if self.queue.full_for(model):
                full = True
                continue
            self._routed(req, model, choice.reason if index == 0 else "fallback")
            req.fallbacks = choice.candidates[index + 1 :]
            return model
        if full:
            raise ServiceUnavailable("inference queue is full", headers=[(b"Retry-After", b"2")])
        raise ServiceUnavailable(
            f"no healthy worker serves {req.model!r} ({', '.join(m or 'any' for m in choice.candidates)})",
            headers=[(b"Retry-After", b"5")],
        )

    def _routed(self, req: GenerationRequest, model: str, reason: str) -> None:
        m = self.metrics
        m.routed.labels(m.route_label(req.route, self.routes.current.routes), m.model_label(model), reason).inc()

    def _fall_back(self, req: GenerationRequest, ticket: Ticket) -> bool:
        """Every worker of the ticket's model failed it: move it to the next candidate that has one."""
        while req.fallbacks:
            model, req.fallbacks = req.fallbacks[0], req.fallbacks[1:]
            if any(w.available and w.serves(model) and w.id not in ticket.excluded for w in self.pool.workers):
                ticket.model = model
                self._routed(req, model, "fallback")
                return True
        return False

    async def _wait_for_worker(self, ticket: Ticket, deadline: float, retry: bool) -> WorkerClient:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WorkerClient] = loop.create_future()
        ticket.payload = waiter
        self.queue.push(ticket, keep_seq=retry)
        self.schedule()
        if waiter.done():  # a free worker took it at once: no need to wait a loop pass for the future
            return waiter.result()
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
        model = self.route(req)
        loop = asyncio.get_running_loop()
        m = self.metrics
        model_label = m.model_label(model or req.model)
        prio = priority_label(req.priority)
        deadline = loop.time() + (self.limits.inference_timeout or 1e9)
        submitted = time.perf_counter()
        key = coalesce_key(req, model) if self.coalescer is not None else None
        shared = self.coalescer.find(key) if self.coalescer is not None and key is not None else None
        source: AsyncGenerator[inference_pb2.TokenResponse, None]
        if shared is not None:
            m.coalesced.labels(model_label).inc()
            ticket = shared.ticket
            if ticket.queued:
                self.queue.raise_priority(ticket, req.priority)
                self.schedule()
            source = shared.follow()
        else:
            text = req.full_text()
            ticket = Ticket(
                model=model,
                priority=req.priority,
                tenant=req.tenant or "client:" + req.client,
                cost=estimate_tokens(text) + req.max_tokens,
                weight=req.weight,
            )
            if isinstance(self.placement, PrefixAffinity):
                ticket.blocks, ticket.block_span = prompt_blocks(text)
            dispatch = self._dispatch(req, ticket, deadline, submitted)
            if self.coalescer is not None and key is not None:
                shared = self.coalescer.start(key, dispatch, ticket)
                source = shared.follow()
            else:
                source = dispatch
        status = "error"
        tokens = prompt_tokens = cached_tokens = 0
        first = True
        self.in_flight += 1
        m.in_flight.set(self.in_flight)
        try:
            async for resp in source:
                if first:
                    first = False
                    m.ttft.labels(model_label).observe(time.perf_counter() - submitted)
                    req.served_model = ticket.served_model or req.model
                tokens = resp.token_count or tokens + (1 if resp.token else 0)
                if resp.prompt_tokens:
                    prompt_tokens, cached_tokens = resp.prompt_tokens, resp.cached_tokens
                yield resp
                if resp.finished:
                    status = "success"
                    return
            raise GenerationFailed("worker ended the stream without finishing")
        except GatewayTimeout:
            status = "timeout"
            raise
        except GenerationFailed as exc:
            status = "timeout" if exc.timed_out else "error"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            await source.aclose()
            self.in_flight -= 1
            m.in_flight.set(self.in_flight)
            m.requests.labels(model_label, prio, status).inc()
            m.duration.labels(model_label).observe(time.perf_counter() - submitted)
            if tokens:
                m.tokens.labels(model_label).inc(tokens)
            if prompt_tokens:
                m.prompt_tokens.labels(model_label).inc(prompt_tokens)
                m.cached_tokens.labels(model_label).inc(cached_tokens)

    async def _dispatch(
        self, req: GenerationRequest, ticket: Ticket, deadline: float, submitted: float
    ) -> AsyncGenerator[inference_pb2.TokenResponse, None]:
        """One worker generation for `ticket`: queue, call, retry elsewhere before the first token."""
        loop = asyncio.get_running_loop()
        m = self.metrics
        message = req.to_proto().SerializeToString()
        retry = False
        first = True
        while True:
            model_label = m.model_label(ticket.model or req.model)  # a fallback changes it
            worker = await self._wait_for_worker(ticket, deadline, retry)
            dispatched = time.perf_counter()
            if not retry:
                m.queue_wait.labels(model_label, priority_label(ticket.priority)).observe(dispatched - submitted)
            ticket.served_model = ticket.model or worker.only_model or ""
            worker_status = "error"
            call = worker.generate(message, timeout=max(0.001, deadline - loop.time()))
            watch = StallWatch(call, self.limits.token_timeout)
            try:
                async for resp in call:
                    watch.last = loop.time()
                    if resp.error:
                        if first:
                            raise BadGateway(f"generation failed: {_one_line(resp.error)}")
                        raise GenerationFailed(_one_line(resp.error))
                    if first:
                        first = False
                        self.placement.observed(worker.id, ticket, resp.prompt_tokens, resp.cached_tokens)
                    if resp.finished:
                        worker_status = "success"  # before the yield: the consumer may close us there
                    watch.waiting = False  # a slow client is not a stalled worker
                    yield resp
                    if resp.finished:
                        return
                    watch.waiting = True
                    watch.last = loop.time()
                raise GenerationFailed("worker ended the stream without finishing")
            except (RpcError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError):
                    current = asyncio.current_task()
                    if not watch.stalled or (current is not None and current.cancelling()):
                        raise  # our own cancellation (the client left), not a stall
                    why = f"no message for {self.limits.token_timeout:g}s"
                    worker.record_failure(f"stalled: {why}")
                    if not first:
                        raise GenerationFailed(f"worker {worker.id} stalled: {why}") from None
                    code_name = "STALLED"
                else:
                    code = exc.code()
                    code_name = code.name
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        worker_status = "timeout"
                        if first:
                            raise GatewayTimeout("inference timed out") from None
                        raise GenerationFailed("inference timed out", timed_out=True) from None
                    if code == grpc.StatusCode.UNAVAILABLE and worker.eject_now(exc.details() or "unavailable"):
                        self.schedule()
                    else:
                        worker.record_failure(f"{code.name}: {exc.details()}")
                    if not first:
                        raise GenerationFailed(f"worker {worker.id} failed: {code.name}") from None
                # Nothing reached the client yet: try another worker.
                ticket.excluded.add(worker.id)
                left = any(w.serves(ticket.model) and w.id not in ticket.excluded for w in self.pool.workers)
                if not left and not self._fall_back(req, ticket):
                    raise ServiceUnavailable(
                        f"inference workers failed: {code_name}", headers=[(b"Retry-After", b"2")]
                    ) from None
                log.info(
                    "request %s: worker %s failed before the first token (%s); retrying",
                    req.request_id,
                    worker.id,
                    code_name,
                )
                retry = True
            finally:
                watch.stop()
                if worker_status != "success":  # a call that sent its last message ends by itself
                    call.cancel()
                m.processing.labels(model_label, worker.id).observe(time.perf_counter() - dispatched)
                m.worker_requests.labels(worker.id, worker_status).inc()
                self._release(worker)


class StallWatch:
    """Cancels a worker call that sends nothing for `timeout` seconds (`stalled` says so).

    One timer per stream, moved lazily: a message only records its time, and
    the timer, when it fires early, re-arms for the rest of the interval.
    """

    def __init__(self, call: Call[inference_pb2.TokenResponse], timeout: float) -> None:
        self.call = call
        self.timeout = timeout
        self.stalled = False
        self.waiting = True  # False while the consumer holds a message
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._timer = self._loop.call_later(timeout, self._check) if timeout > 0 else None

    def _check(self) -> None:
        idle = self._loop.time() - self.last if self.waiting else 0.0
        if idle >= self.timeout:
            self.stalled = True
            self._timer = None
            self.call.cancel()
        else:
            self._timer = self._loop.call_later(self.timeout - idle, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]
