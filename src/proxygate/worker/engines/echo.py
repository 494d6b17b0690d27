"""The seed's mock worker: `[model] ` then the prompt's words, one per token.

For routing benchmarks and tests without a real model it can also pretend to
have a prefix cache of `prefix_slots` prompt families (least recently used
evicted): a prompt's `cached_tokens` is the longest word prefix it shares
with a held prompt (at most all its words but one, as the hf engine
reports), and when that is at least half of the held prompt it takes that
prompt's slot; otherwise it takes a new one. `prefill_ms_per_token` delays the first token by that much
per uncached prompt word.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator

from ..admission import PriorityGate
from .base import CacheCounters, EngineStats, GenerationParams, GenerationResult


class SimulatedPrefixCache:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._prompts: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self.counters = CacheCounters()

    def lookup(self, words: list[str]) -> int:
        """Prompt words served from the cache; remembers the prompt."""
        if self.slots <= 0:
            return 0
        best, best_key = 0, None
        for key in self._prompts:
            n = _common_prefix(key, words)
            if n > best:
                best, best_key = n, key
        if best_key is not None and 2 * best >= len(best_key):
            # The prompt joins the family it shares most of a prefix with:
            # the slot now holds it (the shared part stays warm, the old tail
            # goes), as a real cache keeps hot prefix blocks and evicts cold
            # tails. A word or two in common does not make a family.
            del self._prompts[best_key]
        cached = min(best, max(0, len(words) - 1))
        key = tuple(words)
        self._prompts[key] = None
        self._prompts.move_to_end(key)
        while len(self._prompts) > self.slots:
            self._prompts.popitem(last=False)
            self.counters.evictions += 1
        self.counters.record(len(words), cached)
        return cached


def _common_prefix(a: tuple[str, ...], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class EchoEngine:
    name = "echo"

    def __init__(
        self,
        models: tuple[str, ...] = (),
        latency: float = 0.0,
        max_concurrency: int = 1,
        *,
        prefill_ms_per_token: float = 0.0,
        prefix_slots: int = 0,
    ) -> None:
        self.models = models
        self.latency = latency
        self.max_concurrency = max_concurrency
        self.prefill_seconds_per_token = prefill_ms_per_token / 1000
        self._gate = PriorityGate(max_concurrency)
        self._cache = SimulatedPrefixCache(prefix_slots)

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    def stats(self) -> EngineStats:
        g = self._gate
        return EngineStats(
            waiting=g.waiting, running=g.running, peak_running=g.peak_running, cache=self._cache.counters
        )

    async def generate(self, params: GenerationParams, result: GenerationResult) -> AsyncGenerator[str, None]:
        async with self._gate.slot(params.priority):
            text = " ".join(content for _role, content in params.messages) if params.messages else params.prompt
            words = text.split()
            result.prompt_tokens = len(words)
            result.cached_tokens = self._cache.lookup(words)
            if self.prefill_seconds_per_token > 0:
                await asyncio.sleep((len(words) - result.cached_tokens) * self.prefill_seconds_per_token)
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
