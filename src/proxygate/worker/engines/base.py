"""What a worker needs from an engine: tokens for a request, as they are made."""

from __future__ import annotations

from collections.abc import AsyncIterator
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


@dataclass(slots=True)
class GenerationResult:
    """Filled in by the engine while it streams; read by the server at the end."""

    finish_reason: str = "length"
    prompt_tokens: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class Engine(Protocol):
    name: str
    models: tuple[str, ...]  # empty: serves any model name
    max_concurrency: int

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Load whatever is needed; the worker reports not-ready until this returns."""

    def generate(self, params: GenerationParams, result: GenerationResult) -> AsyncIterator[str]:
        """Yield token texts. Cancelling the consumer must stop the work within one step."""

    async def aclose(self) -> None: ...
