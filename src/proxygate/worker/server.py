"""`proxygate worker`: the gRPC ModelService over one engine.

At most `max_concurrency` sequences run at once (the rest wait, counted as
the queue in Health). A cancelled call (client gone, gateway deadline) stops
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
        self.slots = asyncio.Semaphore(engine.max_concurrency)
        self.waiting = 0
        self.active = 0
        self.peak_active = 0
        self.started = 0
        self.cancelled = 0

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
        )
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        self.started += 1
        result = GenerationResult()
        count = 0
        try:
            async for token in self.engine.generate(params, result):
                count += 1
                yield inference_pb2.TokenResponse(request_id=params.request_id, token=token, token_count=count)
            yield inference_pb2.TokenResponse(
                request_id=params.request_id,
                finished=True,
                token_count=count,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
            )
        except asyncio.CancelledError:
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
            self.active -= 1
            self.slots.release()

    async def Health(
        self, request: inference_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.HealthResponse:
        engine = self.engine
        return inference_pb2.HealthResponse(
            healthy=True,
            current_queue_size=self.waiting,
            gpu_utilization=0.0,
            models=list(engine.models),
            max_concurrency=engine.max_concurrency,
            active_sequences=self.active,
            ready=engine.ready,
            engine=engine.name,
            generations_started=self.started,
            generations_cancelled=self.cancelled,
            peak_active=self.peak_active,
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
