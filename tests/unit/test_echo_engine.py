"""The echo engine's simulated prefix cache (for routing tests and benchmarks without a model)."""

from __future__ import annotations

import asyncio

from proxygate.worker.engines.base import GenerationParams, GenerationResult
from proxygate.worker.engines.echo import EchoEngine


def run(engine: EchoEngine, prompt: str) -> tuple[str, GenerationResult]:
    async def main() -> tuple[str, GenerationResult]:
        result = GenerationResult()
        params = GenerationParams(request_id="r", model="m", prompt=prompt, max_tokens=100)
        text = "".join([t async for t in engine.generate(params, result)])
        return text, result

    return asyncio.run(main())


def test_without_slots_nothing_is_cached() -> None:
    engine = EchoEngine()
    run(engine, "a b c")
    text, result = run(engine, "a b c d")
    assert text == "[m] a b c d " and result.cached_tokens == 0 and result.prompt_tokens == 4


def test_shared_word_prefix_is_reported_as_cached() -> None:
    engine = EchoEngine(prefix_slots=4)
    prefix = " ".join(f"w{i}" for i in range(20))
    assert run(engine, prefix + " one")[1].cached_tokens == 0
    _, result = run(engine, prefix + " two three")
    assert (result.prompt_tokens, result.cached_tokens) == (22, 20)
    assert run(engine, prefix + " two three")[1].cached_tokens == 21  # all but the last word
    s = engine.stats()
    assert (s.cache.queries, s.cache.hits, s.cache.hit_tokens) == (3, 2, 41)


def test_least_recently_used_prompt_family_is_evicted() -> None:
    engine = EchoEngine(prefix_slots=2)
    run(engine, "a a a a")
    run(engine, "b b b b")
    assert run(engine, "a a a x")[1].cached_tokens == 3  # joins the "a" family's slot: nothing evicted
    assert engine.stats().cache.evictions == 0
    run(engine, "c c c c")  # a third family: "b b b b" is the least recently used
    assert engine.stats().cache.evictions == 1
    assert run(engine, "b b b y")[1].cached_tokens == 0  # gone; its return evicts "a a a x"
    assert run(engine, "c c c y")[1].cached_tokens == 3
    assert run(engine, "a a a a z")[1].cached_tokens == 0
    assert engine.stats().cache.evictions == 3
