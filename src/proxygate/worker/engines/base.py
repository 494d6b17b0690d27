"""What a worker needs from an engine: tokens for a request, as they are made."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GenerationParams:
    request_id: str
    model: str
    prompt: str
    max_tokens: int = 100
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    raw_prompt: bool = False  # True: no chat template (completions); False: the prompt is a user message
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) of a whole chat; replaces `prompt`
    priority: int = 1  # higher is admitted first when the engine is full


@dataclass(slots=True)
class GenerationResult:
    """Filled in by the engine while it streams; read by the server at the end."""

    finish_reason: str = "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class CacheCounters:
    """A prefix cache's counters since the worker started (real or simulated)."""

    queries: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least part of a cached prefix
    query_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0

    def record(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.queries += 1
        self.query_tokens += prompt_tokens
        if cached_tokens:
            self.hits += 1
            self.hit_tokens += cached_tokens


@dataclass(slots=True)
class EngineStats:
    """What Health reports of an engine: its load and its prefix cache."""

    waiting: int = 0  # admitted to the engine's queue, not yet running
    running: int = 0
    peak_running: int = 0
    cache_capacity_bytes: int = 0
    cache_used_bytes: int = 0
    cache: CacheCounters = field(default_factory=CacheCounters)


class Engine(Protocol):
    name: str
    models: tuple[str, ...]  # empty: serves any model name
    max_concurrency: int

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Load whatever is needed; the worker reports not-ready until this returns."""

    def generate(self, params: GenerationParams, result: GenerationResult) -> AsyncGenerator[str, None]:
        """Yield token texts (`result.prompt_tokens`/`cached_tokens` are set before the first).

        The engine admits at most `max_concurrency` generations at once and
        queues the rest by priority. Cancelling the consumer must stop the
        work within one step.
        """

    def stats(self) -> EngineStats: ...

    async def aclose(self) -> None: ...
