"""EngineCore's scheduling with a fake model runner: admission by priority, chunked
prefill beside decoding, prefix reuse, cancellation, and failures contained to their sequence.

The turns are driven one by one from the test (no thread), so every order is exact.
"""

from __future__ import annotations

import pytest

try:
    import torch
except ImportError:
    pytest.fail("the hf engine's tests need torch: ./scripts/install worker,test", pytrace=False)

from proxygate.worker.engines.base import GenerationParams  # noqa: E402
from proxygate.worker.serving.core import EngineCore, Finished, Sequence, Started  # noqa: E402
from proxygate.worker.serving.kv_cache import KvCache  # noqa: E402
from proxygate.worker.serving.prefix_cache import PrefixIndex  # noqa: E402
from proxygate.worker.serving.runner import StepBatch  # noqa: E402

VOCAB = 64
POISON = 13  # a prompt holding this token makes the fake model fail


class FakeRunner:
    """Next token = last token + 1; records each step's shape."""

    def __init__(self) -> None:
        self.steps: list[StepBatch] = []

    def forward(self, batch: StepBatch, kv: KvCache) -> torch.Tensor:
        if POISON in batch.tokens[batch.decodes :]:
            raise RuntimeError("poisoned prompt")
        self.steps.append(batch)
        logits = torch.zeros((len(batch.sample_rows), VOCAB))
        for i, row in enumerate(batch.sample_rows):
            nxt = (batch.tokens[row] + 1) % VOCAB or 1
            logits[i, nxt] = 1.0
        return logits


def make_core(slots: int = 4, budget: int = 16, prefix_blocks: int = 0, eos: int = 63) -> EngineCore:
    kv = KvCache(
        layers=1,
        kv_heads=1,
        head_dim=2,
        slots=slots,
        max_len=256,
        block_size=16,
        pool_blocks=prefix_blocks,
        dtype=torch.float32,
        device="cpu",
    )
    prefix = PrefixIndex(prefix_blocks, 16) if prefix_blocks else None
    return EngineCore(
        FakeRunner(),
        kv,
        lambda ids: "".join(f"<{i}>" for i in ids),
        {eos},
        max_step_tokens=budget,
        prefix=prefix,
    )


class Client:
    def __init__(self, core: EngineCore, name: str, prompt: list[int], priority: int = 1, max_tokens: int = 5):
        self.events: list[object] = []
        params = GenerationParams(request_id=name, model="m", prompt="", max_tokens=max_tokens, temperature=0)
        params = GenerationParams(**{**_fields(params), "priority": priority})
        self.seq = Sequence(params, prompt, self.events.append)
        core.submit(self.seq)

    @property
    def text(self) -> str:
        return "".join(e for e in self.events if isinstance(e, str))

    @property
    def finished(self) -> Finished | None:
        return next((e for e in self.events if isinstance(e, Finished)), None)

    @property
    def error(self) -> BaseException | None:
        return next((e for e in self.events if isinstance(e, BaseException)), None)

    @property
    def started(self) -> Started | None:
        return next((e for e in self.events if isinstance(e, Started)), None)


def _fields(params: GenerationParams) -> dict[str, object]:
    return {name: getattr(params, name) for name in GenerationParams.__slots__}  # type: ignore[attr-defined]


def run(core: EngineCore, *clients: Client, turns: int = 1000) -> None:
    for _ in range(turns):
        if all(c.seq.done for c in clients):
            return
        core._turn()
    raise AssertionError("not finished")


def test_generates_until_max_tokens() -> None:
    core = make_core()
    c = Client(core, "a", [1, 2, 3], max_tokens=4)
    run(core, c)
    assert c.text == "<4><5><6><7>" and c.finished == Finished("length")
    assert c.started == Started(prompt_tokens=3, cached_tokens=0)
    assert core.kv.free_slots == 4


def test_eos_finishes_with_stop() -> None:
    core = make_core(eos=6)
    c = Client(core, "a", [1, 2, 3], max_tokens=10)
    run(core, c)
    assert c.text == "<4><5>" and c.finished == Finished("stop")


def test_failure_while_joining_fails_only_that_sequence() -> None:
    core = make_core()
    a = Client(core, "a", [1, 2, 3], max_tokens=20)
    core._turn()
    core._turn()
    assert a.text  # a is decoding
    bad = Client(core, "bad", [20, POISON, 21])
    run(core, a, bad)
    assert isinstance(bad.error, RuntimeError)
    assert a.error is None and a.finished == Finished("length")
    assert a.text == "".join(f"<{i}>" for i in range(4, 24))
    assert core.kv.free_slots == 4


def test_full_engine_admits_by_priority_then_arrival() -> None:
    core = make_core(slots=1)
    first = Client(core, "first", [1], max_tokens=3)
    core._turn()
    low = Client(core, "low", [1], priority=1, max_tokens=1)
    high = Client(core, "high", [1], priority=9, max_tokens=1)
    low2 = Client(core, "low2", [1], priority=1, max_tokens=1)
    assert core.stats.waiting == 3
    order: list[str] = []
    for _ in range(50):
        for c in (first, low, high, low2):
            if c.started and c.seq.params.request_id not in order:
                order.append(c.seq.params.request_id)
        if all(c.seq.done for c in (first, low, high, low2)):
            break
        core._turn()
    assert order == ["first", "high", "low", "low2"]
    assert core.stats.peak_running == 1


def test_long_prompt_is_chunked_while_others_keep_decoding() -> None:
    core = make_core(budget=32)
    runner: FakeRunner = core.runner  # type: ignore[assignment]
    a = Client(core, "a", [1, 2], max_tokens=30)
    core._turn()
    core._turn()
    long = Client(core, "long", [2] * 150, max_tokens=2)
    runner.steps.clear()
    run(core, a, long)
    with_chunks = [s for s in runner.steps if s.chunks]
    assert len(with_chunks) >= 5  # 150 tokens in chunks of at most 31
    assert all(s.decodes >= 1 and len(s.tokens) <= 32 for s in with_chunks)  # a decoded in each of them
    assert long.text == "<3><4>"


def test_shared_prefix_is_reused_and_reported() -> None:
    core = make_core(prefix_blocks=8)
    prefix = list(range(20, 52))  # two full blocks
    first = Client(core, "first", prefix + [40, 41], max_tokens=2)
    run(core, first)
    again = Client(core, "again", prefix + [50], max_tokens=2)
    run(core, again)
    assert first.started == Started(prompt_tokens=34, cached_tokens=0)
    assert again.started == Started(prompt_tokens=33, cached_tokens=32)
    whole = Client(core, "whole", prefix, max_tokens=1)  # all cached: the last token is computed again
    run(core, whole)
    assert whole.started == Started(prompt_tokens=32, cached_tokens=31)
    assert core.prefix is not None and core.prefix.counters.hits == 2


def test_a_finished_answer_is_cached_for_the_next_turn() -> None:
    core = make_core(prefix_blocks=8)
    turn1 = Client(core, "turn1", list(range(20, 40)), max_tokens=20)  # answers 40, 41, ... 59
    run(core, turn1)
    # The next turn repeats prompt and answer, then adds more: 32 of its tokens have KV.
    turn2 = Client(core, "turn2", list(range(20, 40)) + list(range(40, 60)) + [5, 6], max_tokens=1)
    run(core, turn2)
    assert turn2.started is not None and turn2.started.cached_tokens == 32


def test_prefix_cache_copies_real_kv() -> None:
    core = make_core(prefix_blocks=4)
    core.kv.keys[0, 0, 0, :16] = torch.arange(32, dtype=torch.float32).view(16, 2)
    seq = Client(core, "a", list(range(20, 37)), max_tokens=1).seq
    seq.slot = 0
    core.kv.allocate()
    from proxygate.worker.serving.prefix_cache import block_digests

    assert core.prefix is not None
    seq.digests = block_digests(seq.prompt, 16)
    core._remember(seq, seq.digests)
    core.kv.load_blocks(2, core.prefix.match(seq.digests))
    assert torch.equal(core.kv.keys[0, 2, 0, :16], core.kv.keys[0, 0, 0, :16])


def test_cancelled_sequences_leave_queue_and_slot() -> None:
    core = make_core(slots=1)
    a = Client(core, "a", [1], max_tokens=50)
    b = Client(core, "b", [1], max_tokens=50)
    core._turn()
    core.cancel(b.seq)  # still waiting
    core.cancel(a.seq)  # running
    core._turn()
    assert core.stats.running == 0 and core.stats.waiting == 0
    assert core.kv.free_slots == 1 and b.started is None


def test_prompt_longer_than_the_context_fails_alone() -> None:
    core = make_core()
    a = Client(core, "a", [1, 2], max_tokens=3)
    big = Client(core, "big", [1] * 300)
    run(core, a, big)
    assert "does not fit" in str(big.error) and a.finished == Finished("length")


def test_stop_string_split_over_tokens_does_not_leak() -> None:
    core = make_core()
    params = GenerationParams(request_id="s", model="m", prompt="", max_tokens=10, temperature=0, stop=("<6><7>",))
    events: list[object] = []
    seq = Sequence(params, [1, 2, 3], events.append)
    core.submit(seq)
    for _ in range(20):
        if seq.done:
            break
        core._turn()
    assert "".join(e for e in events if isinstance(e, str)) == "<4><5>"
    assert Finished("stop") in events


def test_hf_engine_loads_and_decodes_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torch call of the hf engine happens on one thread (why: proxygate.worker.engines.hf):
    the model is built and the decode loop runs there, not on the event loop's thread."""
    import asyncio
    import threading

    from proxygate.config import WorkerSettings
    from proxygate.worker.engines import hf
    from proxygate.worker.engines.base import GenerationResult

    threads: dict[str, int] = {}
    core = make_core()
    forward = core.runner.forward

    def recording_forward(batch: StepBatch, kv: KvCache) -> torch.Tensor:
        threads["forward"] = threading.get_ident()
        return forward(batch, kv)

    def fake_build(settings: WorkerSettings) -> tuple[EngineCore, object]:
        threads["build"] = threading.get_ident()
        core.runner.forward = recording_forward  # type: ignore[method-assign]
        return core, object()

    monkeypatch.setattr(hf, "build_core", fake_build)

    async def scenario() -> str:
        engine = hf.HfEngine(WorkerSettings(engine="hf"))
        monkeypatch.setattr(engine, "encode_prompt", lambda params: [1, 2, 3])
        await engine.start()
        params = GenerationParams(request_id="t", model="m", prompt="hi", max_tokens=3, temperature=0)
        text = "".join([piece async for piece in engine.generate(params, GenerationResult())])
        await engine.aclose()
        return text

    assert asyncio.run(scenario()) == "<4><5><6>"
    assert threads["forward"] == threads["build"] != threading.get_ident()
    assert core._stopped.is_set()  # aclose returned after the loop did


def test_hf_engine_start_fails_when_the_build_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from proxygate.config import WorkerSettings
    from proxygate.worker.engines import hf

    def broken_build(settings: WorkerSettings) -> tuple[EngineCore, object]:
        raise FileNotFoundError("model path /nowhere does not exist")

    monkeypatch.setattr(hf, "build_core", broken_build)
    engine = hf.HfEngine(WorkerSettings(engine="hf"))
    with pytest.raises(FileNotFoundError, match="/nowhere"):
        asyncio.run(engine.start())
    assert not engine.ready
