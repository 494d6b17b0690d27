"""The seed's mock worker: `[model] ` then the prompt's words, one per token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from ..admission import PriorityGate
from .base import EngineStats, GenerationParams, GenerationResult


class EchoEngine:
    name = "echo"

    def __init__(self, models: tuple[str, ...] = (), latency: float = 0.0, max_concurrency: int = 1) -> None:
        self.models = models
        self.latency = latency
        self.max_concurrency = max_concurrency
        self._gate = PriorityGate(max_concurrency)

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    def stats(self) -> EngineStats:
        g = self._gate
        return EngineStats(waiting=g.waiting, running=g.running, peak_running=g.peak_running)

    async def generate(self, params: GenerationParams, result: GenerationResult) -> AsyncGenerator[str, None]:
        async with self._gate.slot(params.priority):
            text = " ".join(content for _role, content in params.messages) if params.messages else params.prompt
            words = text.split()
            result.prompt_tokens = len(words)
            tokens = [f"[{params.model}] "] + [w + " " for w in words]
            result.finish_reason = "stop" if len(tokens) <= params.max_tokens else "length"
            for token in tokens[: params.max_tokens]:
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                else:
                    await asyncio.sleep(0)  # stay cancellable and fair with zero latency
                yield token

    async def aclose(self) -> None:
        return None
