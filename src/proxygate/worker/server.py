"""`proxygate worker`: the gRPC ModelService over one engine.

The engine admits at most `max_concurrency` sequences at once and queues
the rest by the request's priority (it knows its memory; Health reports its
queue). A cancelled call (client gone, gateway deadline) stops
its generation at the engine's next step. Engine errors travel in
TokenResponse.error, never as a crash of the stream.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import grpc

from .._pb import inference_pb2, inference_pb2_grpc
from .engines.base import Engine, GenerationParams, GenerationResult

log = logging.getLogger("proxygate.worker")


class ModelService(inference_pb2_grpc.ModelServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started = 0
        self.cancelled = 0
        self.calls = 0  # Generate calls in flight: what gateways offered us
        self.peak_calls = 0

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.TokenResponse]:
        params = GenerationParams(
            request_id=request.request_id,
            model=request.model,
            prompt=request.prompt,
            max_tokens=request.max_tokens if request.max_tokens > 0 else 100,
            temperature=max(0.0, request.temperature),
            top_p=request.top_p if 0 < request.top_p <= 1 else 1.0,
            stop=tuple(request.stop),
            seed=request.seed if request.has_seed else None,
            raw_prompt=request.raw_prompt,
            messages=tuple((m.role, m.content) for m in request.messages),
            priority=request.priority,
        )
        self.started += 1
        self.calls += 1
        self.peak_calls = max(self.peak_calls, self.calls)
        result = GenerationResult()
        count = 0
        tokens = self.engine.generate(params, result)
        try:
            async for token in tokens:
                count += 1
                first = count == 1  # the first message says what the prompt cost (0 = unset elsewhere)
                yield inference_pb2.TokenResponse(
                    request_id=params.request_id,
                    token=token,
                    token_count=count,
                    prompt_tokens=result.prompt_tokens if first else 0,
                    cached_tokens=result.cached_tokens if first else 0,
                )
            yield inference_pb2.TokenResponse(
                request_id=params.request_id,
                finished=True,
                token_count=count,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.cached_tokens,
            )
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled while the engine ran: CancelledError here. Cancelled while
            # grpc was sending our last message: grpc's task is the one cancelled,
            # and this generator is closed afterwards (GeneratorExit at the yield).
            # Counted either way: we cannot tell whether the caller had our last
            # message, so callers must not cancel a call that delivered it (the
            # gateway does not).
            self.cancelled += 1
            log.debug("generation %s cancelled after %d tokens", params.request_id, count)
            raise
        except Exception as exc:  # the engine failed: tell the caller, keep serving
            log.exception("generation %s failed", params.request_id)
            yield inference_pb2.TokenResponse(
                request_id=params.request_id,
                finished=True,
                error=f"{type(exc).__name__}: {exc}",
                token_count=count,
                finish_reason="error",
            )
        finally:
            # Close the engine's stream now, not when it is garbage collected:
            # that is what releases its sequence when the call is cancelled.
            self.calls -= 1
            await tokens.aclose()

    async def Health(
        self, request: inference_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.HealthResponse:
        engine = self.engine
        s = engine.stats()
        return inference_pb2.HealthResponse(
            healthy=True,
            current_queue_size=s.waiting,
            gpu_utilization=0.0,
            models=list(engine.models),
            max_concurrency=engine.max_concurrency,
            active_sequences=s.running,
            ready=engine.ready,
            engine=engine.name,
            generations_started=self.started,
            generations_cancelled=self.cancelled,
            peak_active=s.peak_running,
            peak_calls=self.peak_calls,
            prefix_cache_capacity_bytes=s.cache_capacity_bytes,
            prefix_cache_used_bytes=s.cache_used_bytes,
            prefix_cache_queries=s.cache.queries,
            prefix_cache_hits=s.cache.hits,
            prefix_cache_query_tokens=s.cache.query_tokens,
            prefix_cache_hit_tokens=s.cache.hit_tokens,
            prefix_cache_evictions=s.cache.evictions,
        )


async def serve_worker(engine: Engine, host: str, port: int) -> int:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    service = ModelService(engine)
    inference_pb2_grpc.add_ModelServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        log.error("cannot listen on %s:%d", host, port)
        return 1
    await server.start()
    shown = f"[{host}]" if ":" in host else host
    log.info("worker listening on %s:%d (engine %s)", shown, bound, engine.name)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loader = loop.create_task(engine.start())
    failed: list[BaseException] = []

    def loaded(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())  # type: ignore[arg-type]
            log.error("engine failed to start: %s", task.exception())
            stop.set()

    loader.add_done_callback(loaded)
    try:
        await stop.wait()
    finally:
        loader.cancel()
        await server.stop(grace=5)
        await engine.aclose()
        log.info("worker stopped")
    return 1 if failed else 0
