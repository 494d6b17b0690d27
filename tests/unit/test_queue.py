"""Priority queue and scheduler, as pure logic."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxygate.errors import BadRequest
from proxygate.inference.api import parse_generation
from proxygate.inference.queue import RequestQueue, Ticket
from proxygate.inference.scheduler import assign


@dataclass
class FakeWorker:
    id: str
    capacity: int = 1
    active: int = 0
    models: frozenset[str] | None = None
    up: bool = True

    available: bool = True

    @property
    def free_slots(self) -> int:
        return self.capacity - self.active if self.up else 0

    def serves(self, model: str) -> bool:
        return self.models is None or not model or model in self.models


def test_priority_then_fifo() -> None:
    q = RequestQueue(100)
    tickets = [Ticket("", p, payload=i) for i, p in enumerate([1, 5, 1, 9, 5])]
    for t in tickets:
        q.push(t)
    w = FakeWorker("w", capacity=10)
    order = [t.payload for t, _ in assign(q, [w])]
    assert order == [3, 1, 4, 0, 2]
    assert len(q) == 0 and w.active == 5


def test_removal_and_bound() -> None:
    q = RequestQueue(2)
    a, b = Ticket("", 1), Ticket("", 1)
    q.push(a)
    q.push(b)
    assert q.full_for("")
    assert q.remove(a) and not q.remove(a)
    assert len(q) == 1 and not q.full_for("")
    assert [t for t, _ in assign(q, [FakeWorker("w")])] == [b]


def test_capacity_and_least_loaded() -> None:
    q = RequestQueue(100)
    for _ in range(7):
        q.push(Ticket("", 1))
    a, b = FakeWorker("a", capacity=4), FakeWorker("b", capacity=2)
    out = assign(q, [a, b])
    assert len(out) == 6 and a.active == 4 and b.active == 2 and len(q) == 1
    # Balanced by load ratio while filling.
    assert [w.id for _, w in out][:3] in (["a", "b", "a"], ["b", "a", "a"])


def test_no_head_of_line_blocking_across_models() -> None:
    q = RequestQueue(100)
    big = Ticket("large", 9, payload="large")
    small = Ticket("small", 1, payload="small")
    q.push(big)
    q.push(small)
    only_small = FakeWorker("s", models=frozenset({"small"}))
    out = assign(q, [only_small])
    assert [t.payload for t, _ in out] == ["small"] and len(q) == 1


def test_excluded_worker_skipped_and_retry_keeps_place() -> None:
    q = RequestQueue(100)
    first = Ticket("", 1, payload="first")
    q.push(first)
    later = Ticket("", 1, payload="later")
    q.push(later)
    ((t, _),) = assign(q, [FakeWorker("a")])
    assert t is first
    first.excluded.add("a")
    q.push(first, keep_seq=True)  # retried: back at the head of the line
    b = FakeWorker("b")
    out = assign(q, [FakeWorker("a"), b])
    assert out[0][0] is first and out[0][1] is b


def test_temperature_zero_is_kept_and_defaults() -> None:
    g = parse_generation(
        {"prompt": "x", "temperature": 0}, "r", max_tokens_limit=10, max_prompt_bytes=100, header_priority=None
    )
    assert g.temperature == 0.0 and g.to_proto().temperature == 0.0
    g = parse_generation({"prompt": "x"}, "r", max_tokens_limit=10, max_prompt_bytes=100, header_priority=b"7")
    assert (g.temperature, g.max_tokens, g.priority, g.model) == (pytest.approx(0.7), 10, 7, "default-model")
    with pytest.raises(BadRequest, match="max_tokens"):
        parse_generation(
            {"prompt": "x", "max_tokens": 11}, "r", max_tokens_limit=10, max_prompt_bytes=100, header_priority=None
        )
