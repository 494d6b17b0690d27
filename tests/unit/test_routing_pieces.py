"""Routing as pure logic: the routes file, placement policies, the coalescer, re-prioritised tickets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxygate._pb import inference_pb2
from proxygate.inference.coalesce import Coalescer, coalesce_key
from proxygate.inference.placement import BLOCK_BYTES, PrefixAffinity, RoundRobin, prompt_blocks
from proxygate.inference.queue import RequestQueue, Ticket
from proxygate.inference.routes import RoutesError, RoutesFile, parse_routes
from proxygate.inference.scheduler import assign
from proxygate.inference.service import GenerationRequest

ROUTES = """
[models.small]
serve = ["s"]
[models.large]
serve = ["l", "s"]
max_tokens = 64
[models.auto]
small = "small"
large = "large"
large_if_prompt_tokens_over = 10
large_if_max_tokens_over = 100
large_if_matches = ['(?i)\\bprove\\b']
max_tokens = 32
"""


def test_routes_resolve_names_choosers_and_caps() -> None:
    table = parse_routes(ROUTES)
    assert table.names() == ["auto", "large", "small"]
    assert table.resolve("unknown", "x", None) is None
    large = table.resolve("large", "x", None)
    assert large is not None and (large.candidates, large.reason, large.max_tokens) == (("l", "s"), "direct", 64)
    for text, max_tokens, size in (
        ("short", None, "small"),
        ("short", 100, "small"),  # rules are "over"
        ("short", 101, "large"),
        ("x" * 41, None, "large"),  # 41 bytes ≈ 11 tokens
        ("x" * 40, None, "small"),
        ("now PROVE it", None, "large"),
        ("improve it", None, "small"),  # a word boundary
    ):
        choice = table.resolve("auto", text, max_tokens)
        assert choice is not None and choice.reason == size, (text, max_tokens)
    choice = table.resolve("auto", "now prove it", None)
    assert choice is not None and choice.route == "auto" and choice.max_tokens == 32  # the tighter cap


@pytest.mark.parametrize(
    "text, message",
    [
        ("[models.a\n", "invalid TOML"),
        ("[other]\n", "unknown top-level"),
        ("[models.a]\nserve = []\n", "non-empty list"),
        ('[models.a]\nserve = ["x"]\nmax_token = 3\n', "unknown key"),
        ('[models.a]\nserve = ["x"]\nmax_tokens = 0\n', "max_tokens must be an integer"),
        ('[models.a]\nsmall = "b"\n', "needs both small and large"),
        ('[models.a]\nsmall = "a"\nlarge = "a"\n', "is not a route with serve"),
        (
            '[models.b]\nserve = ["x"]\n[models.a]\nsmall = "b"\nlarge = "b"\nlarge_if_matches = ["("]\n',
            "large_if_matches",
        ),
        ("[models.a]\nweight = 1\n", "needs serve"),
    ],
)
def test_broken_routes_files_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(RoutesError, match=message):
        parse_routes(text)


def test_routes_file_keeps_the_old_table_when_the_new_one_is_broken(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES)
    routes = RoutesFile(str(path))
    routes.load_initial()
    path.write_text("[models.broken\n")
    assert routes.changed_on_disk()
    assert not routes.reload() and routes.current.names() == ["auto", "large", "small"]
    assert not routes.changed_on_disk()  # a broken file is not retried every second
    path.write_text('[models.one]\nserve = ["s"]\n')
    assert routes.reload() and routes.current.names() == ["one"]


# ---- placement ------------------------------------------------------------------------


@dataclass
class FakeWorker:
    id: str
    capacity: int = 4
    active: int = 0

    available: bool = True

    @property
    def free_slots(self) -> int:
        return self.capacity - self.active

    def serves(self, model: str) -> bool:
        return True


def ticket_for(text: str) -> Ticket:
    t = Ticket("", 1)
    t.blocks, t.block_span = prompt_blocks(text)
    return t


def prefix(n: int) -> str:
    return "".join(f"group{n}-" for _ in range(400))[: BLOCK_BYTES * 20]


def test_prompt_blocks_are_chained_whole_blocks() -> None:
    a, span = prompt_blocks("x" * (BLOCK_BYTES * 2 + 5))
    assert len(a) == 2 and span == pytest.approx(2 + 5 / BLOCK_BYTES)
    b, _ = prompt_blocks("y" + "x" * (BLOCK_BYTES * 2 - 1))
    assert a[1] != b[1]  # the second block names its whole prefix, not just itself
    assert prompt_blocks("short")[0] == ()


def test_prefix_policy_follows_the_cache_and_spreads_new_prefixes() -> None:
    workers = [FakeWorker(f"w{i}") for i in range(4)]
    policy = PrefixAffinity()
    home = {}
    for g in range(8):  # eight new prefixes: two per worker
        t = ticket_for(prefix(g) + " first")
        w = policy.choose(workers, t)
        assert w is not None
        policy.observed(w.id, t, 100, 0)
        home[g] = w.id
    assert sorted(list(home.values()).count(w.id) for w in workers) == [2, 2, 2, 2]
    for g in range(8):  # later requests of a group go where its prefix is
        t = ticket_for(prefix(g) + f" again {g}")
        w = policy.choose(workers, t)
        assert w is not None and w.id == home[g] and t.predicted_blocks == 20


def test_prefix_policy_spills_a_hot_prefix_when_its_worker_is_busy() -> None:
    workers = [FakeWorker("a", capacity=8), FakeWorker("b", capacity=8)]
    policy = PrefixAffinity()
    t = ticket_for(prefix(0))
    first = policy.choose(workers, t)
    assert first is not None
    policy.observed(first.id, t, 100, 0)
    other = workers[1] if first is workers[0] else workers[0]
    first.active = 6  # 0.75 busier than the idle one: the cache still wins
    assert policy.choose(workers, ticket_for(prefix(0) + "x")) is first
    first.active = 7  # 0.875 busier: the prefix goes to the idle worker too
    spilled = ticket_for(prefix(0) + "y")
    assert policy.choose(workers, spilled) is other
    policy.observed(other.id, spilled, 100, 0)
    first.active, other.active = 8, 1  # full: a worker that now holds it too takes it
    assert policy.choose(workers, ticket_for(prefix(0) + "z")) is other
    first.active = other.active = 1  # both hold it: always the same one of them
    picks = {policy.choose(workers, ticket_for(prefix(0) + f"q{i}")).id for i in range(5)}  # type: ignore[union-attr]
    assert len(picks) == 1


def test_a_worker_reporting_less_cache_than_predicted_corrects_the_index() -> None:
    worker = FakeWorker("a")
    policy = PrefixAffinity()
    old, new = ticket_for(prefix(1)), ticket_for(prefix(2))
    policy.observed("a", old, 100, 0)
    policy.observed("a", new, 100, 0)
    again = ticket_for(prefix(2) + "z")
    assert policy.choose([worker], again) is worker and again.predicted_blocks == 20
    # The worker says it had nothing cached for prefix 2: its cache evicted it,
    # and with it everything older (prefix 1).
    policy.observed("a", again, 100, 0)
    assert policy.match("a", old.blocks) == 0
    assert policy.match("a", again.blocks) == 20  # it holds prefix 2 now: it just computed it


def test_replicas_place_a_new_prefix_alike() -> None:
    def place(workers: list[FakeWorker]) -> str:
        w = PrefixAffinity().choose(workers, ticket_for(prefix(5)))
        assert w is not None
        return w.id

    names = [f"10.0.0.{i}:50051" for i in range(5)]
    assert place([FakeWorker(n) for n in names]) == place([FakeWorker(n) for n in reversed(names)])


def test_round_robin_takes_turns_among_free_workers() -> None:
    workers = [FakeWorker("a"), FakeWorker("b"), FakeWorker("c", capacity=0)]
    policy = RoundRobin()
    picks = []
    for _ in range(4):
        w = policy.choose(workers, Ticket("", 1))
        assert w is not None
        picks.append(w.id)
    assert picks == ["a", "b", "a", "b"]


# ---- queue and coalescer -------------------------------------------------------------


def test_a_raised_priority_moves_a_queued_ticket_ahead() -> None:
    q = RequestQueue(10)
    low, mid = Ticket("", 1, payload="low"), Ticket("", 5, payload="mid")
    q.push(low)
    q.push(mid)
    q.raise_priority(low, 9)
    q.raise_priority(mid, 2)  # never lowered
    w = FakeWorker("w", capacity=10)
    assert [t.payload for t, _ in assign(q, [w])] == ["low", "mid"]
    assert len(q) == 0 and q.waiting("") == 0


def test_coalesce_key_needs_determinism() -> None:
    req = GenerationRequest(request_id="a", prompt="p", temperature=0.7)
    assert coalesce_key(req, "m") is None
    seeded = GenerationRequest(request_id="b", prompt="p", temperature=0.7, seed=3)
    greedy = GenerationRequest(request_id="c", prompt="p", temperature=0)
    assert coalesce_key(seeded, "m") is not None and coalesce_key(greedy, "m") is not None
    assert coalesce_key(greedy, "m") == coalesce_key(GenerationRequest(request_id="d", prompt="p", temperature=0), "m")
    assert coalesce_key(greedy, "m") != coalesce_key(greedy, "other")
    longer = GenerationRequest(request_id="e", prompt="p", temperature=0, max_tokens=5)
    assert coalesce_key(greedy, "m") != coalesce_key(longer, "m")


def test_shared_generation_replays_then_follows_and_cancels_with_the_last_client() -> None:
    async def main() -> None:
        release = asyncio.Event()
        closed = asyncio.Event()

        async def source() -> AsyncGenerator[inference_pb2.TokenResponse, None]:
            try:
                for i in range(4):
                    if i == 2:
                        await release.wait()
                    yield inference_pb2.TokenResponse(token=f"t{i}", token_count=i + 1)
                await asyncio.Event().wait()  # never finishes by itself
            finally:
                closed.set()

        table = Coalescer()
        gen = table.start("k", source(), Ticket("", 1))
        early = gen.follow()
        assert (await early.__anext__()).token == "t0"
        await asyncio.sleep(0)
        late = table.find("k")
        assert late is gen
        late_stream = gen.follow()
        got = [(await late_stream.__anext__()).token for _ in range(2)]
        assert got == ["t0", "t1"]  # the late client starts from the beginning
        release.set()
        assert [(await early.__anext__()).token for _ in range(3)] == ["t1", "t2", "t3"]
        await early.aclose()  # one leaves: the other goes on
        assert [(await late_stream.__anext__()).token for _ in range(2)] == ["t2", "t3"]
        assert not closed.is_set()
        await late_stream.aclose()  # the last leaves: the generation is cancelled
        await asyncio.wait_for(closed.wait(), 5)
        assert table.find("k") is None

    asyncio.run(main())


def test_the_last_client_leaving_after_the_finished_response_lets_the_source_end() -> None:
    """A client stops at the finished response; the pump has not read the stream's end
    yet. That end must come from the worker, not a cancel (the worker would count one)."""

    async def main() -> None:
        outcome: list[str] = []

        async def source() -> AsyncGenerator[inference_pb2.TokenResponse, None]:
            try:
                yield inference_pb2.TokenResponse(token="t0", token_count=1)
                yield inference_pb2.TokenResponse(finished=True, token_count=1)
                await asyncio.sleep(0.01)  # the call's end (its trailers) comes a little later
                outcome.append("ended")
            except BaseException as exc:
                outcome.append(type(exc).__name__)
                raise

        table = Coalescer()
        gen = table.start("k", source(), Ticket("", 1))
        stream = gen.follow()
        while not (await stream.__anext__()).finished:
            pass
        await stream.aclose()  # as the API does once it has the finished response
        for _ in range(100):
            if outcome:
                break
            await asyncio.sleep(0.005)
        assert outcome == ["ended"]
        assert table.find("k") is None

    asyncio.run(main())


def test_the_shipped_routes_file_parses() -> None:
    root = Path(__file__).resolve().parents[2]
    table = parse_routes((root / "configs" / "routes.toml").read_text())
    assert table.names() == ["auto", "large", "small"]
    choice = table.resolve("auto", "Derive it step by step", None)
    assert choice is not None and choice.reason == "large"
