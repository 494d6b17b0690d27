"""Tenants as pure logic: the key file, credentials, budgets on a fake clock, fair queuing and aging."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxygate._pb import inference_pb2
from proxygate.errors import Forbidden, TooManyRequests
from proxygate.http.message import Request
from proxygate.inference.metrics import InferenceMetrics
from proxygate.inference.queue import RequestQueue, Ticket
from proxygate.inference.service import GenerationRequest
from proxygate.inference.tenancy import TenantGate
from proxygate.policy.budgets import Budgets
from proxygate.policy.keys import KeysError, add_key, basic_credentials, bearer_token, digest, parse_keys
from proxygate.policy.ratelimit import BucketSpec, MemoryLimiter


def test_key_file_parses_and_looks_up_by_digest() -> None:
    table = parse_keys(
        f'[keys.a]\nsha256 = "{digest("tok-a")}"\nmodels = ["m"]\nmax_priority = 3\nweight = 2\nproxy = false\n'
        f'[keys.b]\nsha256 = "{digest("tok-b").upper()}"\ntokens_per_minute = 10\n'
    )
    a, b = table.lookup("tok-a"), table.lookup("tok-b")
    assert a is not None and (a.name, a.max_priority, a.weight, a.proxy) == ("a", 3, 2.0, False)
    assert a.may_use("m") and not a.may_use("other")
    assert b is not None and b.tokens_per_minute == 10 and b.may_use("anything")
    assert table.lookup("tok-c") is None and table.lookup("") is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("[keys.a]\n", "sha256 must be"),
        ('[keys.a]\nsha256 = "abc"\n', "sha256 must be"),
        (f'[keys.a]\nsha256 = "{"0" * 64}"\n[keys.b]\nsha256 = "{"0" * 64}"\n', "same token digest"),
        (f'[keys.a]\nsha256 = "{"0" * 64}"\nmax_priority = 11\n', "max_priority"),
        (f'[keys.a]\nsha256 = "{"0" * 64}"\nweight = 0\n', "weight"),
        (f'[keys.a]\nsha256 = "{"0" * 64}"\ntoken = "x"\n', "unknown key"),
        (f'[keys."a b"]\nsha256 = "{"0" * 64}"\n', "a name is"),
        ("[other]\n", "only"),
    ],
)
def test_broken_key_files_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(KeysError, match=message):
        parse_keys(text)


def test_add_key_stores_only_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    token = add_key(str(path), "one", tokens_per_minute=5, models=["a", 'b"c'], proxy=False)
    text = path.read_text()
    assert token not in text and digest(token) in text
    key = parse_keys(text).lookup(token)
    assert key is not None and key.models == frozenset({"a", 'b"c'}) and not key.proxy
    second = add_key(str(path), "two")
    assert parse_keys(path.read_text()).lookup(second) is not None
    with pytest.raises(KeysError, match="exists"):
        add_key(str(path), "one")


def test_credentials_parsing() -> None:
    assert bearer_token(b"Bearer abc") == "abc" and bearer_token(b"bearer  abc ") == "abc"
    assert bearer_token(b"Basic abc") is None and bearer_token(b"Bearer ") is None and bearer_token(None) is None
    encoded = base64.b64encode(b"team:pg-x:y")
    assert basic_credentials(b"Basic " + encoded) == ("team", "pg-x:y")
    assert basic_credentials(b"Basic !!!") is None and basic_credentials(b"Bearer x") is None


def test_budgets_reserve_refuse_and_settle_on_a_fake_clock() -> None:
    now = [100.0]
    store = MemoryLimiter(BucketSpec(1, 1.0), clock=lambda: now[0])
    budgets = Budgets(store)
    key = parse_keys(f'[keys.k]\nsha256 = "{digest("t")}"\ntokens_per_minute = 600\nrequests_per_minute = 60\n').lookup(
        "t"
    )
    assert key is not None

    async def main() -> None:
        first = await budgets.reserve(key, 500)
        assert b"x-ratelimit-remaining-tokens: 100" in first.head
        with pytest.raises(TooManyRequests) as refused:
            await budgets.reserve(key, 200)
        headers = dict(refused.value.headers)
        assert headers[b"Retry-After"] == b"10"  # 100 tokens over, draining 10 a second
        assert headers[b"x-ratelimit-remaining-tokens"] == b"100"
        # The refused request gave its request unit back: one used so far.
        assert (await budgets.reserve(key, 0)).head.count(b"x-ratelimit-remaining-requests: 58") == 1
        first.settle(50)  # it used 50 of its 500
        await budgets.aclose()
        second = await budgets.reserve(key, 500)  # 50 + 500 fits in 600
        assert b"x-ratelimit-remaining-tokens: 50" in second.head
        now[0] += 60  # a minute later everything has drained
        big = await budgets.reserve(key, 10_000)  # capped at the whole budget: admitted on an empty bucket
        assert big.tokens == 600

    asyncio.run(main())


def test_fair_queuing_serves_a_newcomer_within_one_request_per_tenant() -> None:
    q = RequestQueue(1000)
    for i in range(40):
        q.push(Ticket("", 1, payload=f"a{i}", tenant="a", cost=100))
    taken = [q.heads().__next__()]
    q.take(taken[0])  # a0 runs
    for i in range(4):
        q.push(Ticket("", 1, payload=f"b{i}", tenant="b", cost=100))
    order = []
    while len(q):
        t = next(q.heads())
        q.take(t)
        order.append(t.payload)
    assert order[:8] == ["b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4"]  # the newcomer goes next


def test_weights_scale_the_share() -> None:
    q = RequestQueue(1000)
    for _ in range(6):
        q.push(Ticket("", 1, payload="heavy", tenant="h", cost=100, weight=2))
        q.push(Ticket("", 1, payload="light", tenant="l", cost=100, weight=1))
    order = []
    while len(q):
        t = next(q.heads())
        q.take(t)
        order.append(t.payload)
    assert order[:6].count("heavy") == 4


def test_aging_raises_waiting_tickets_a_level_per_interval() -> None:
    q = RequestQueue(100)
    low = Ticket("", 1, payload="low")
    low.enqueued_at = 0.0
    q.push(low)
    highs = []
    for i in range(3):
        t = Ticket("", 5, payload=f"high{i}")
        t.enqueued_at = 9.0
        q.push(t)
        highs.append(t)
    assert q.age(now=9.5, interval=2.0) == 1 and low.priority == 5  # 4 intervals waited
    assert next(q.heads()) is low  # level with the highs, and queued first
    assert q.age(now=9.6, interval=2.0) == 0
    assert low.base_priority == 1


def test_tenant_gate_applies_a_keys_models_priority_and_weight() -> None:
    key = parse_keys(f'[keys.k]\nsha256 = "{digest("t")}"\nmodels = ["m"]\nmax_priority = 3\nweight = 2\n').lookup("t")
    gate = TenantGate(lambda req: key, None, InferenceMetrics(CollectorRegistry()))
    req = Request("POST", b"/v1/completions", b"1.1", [], True, None, "rid", "10.0.0.7")

    async def main() -> None:
        gen = GenerationRequest(request_id="rid", prompt="p", model="m", priority=9)
        admission = await gate.admit(req, gen)
        assert (gen.priority, gen.tenant, gen.weight, gen.client) == (3, "k", 2.0, "10.0.0.7")
        admission.observe(inference_pb2.TokenResponse(token="a", token_count=1, prompt_tokens=7))
        admission.finish()
        assert dict(req.log_fields) == {"tenant": "k", "prompt_tokens": "7", "completion_tokens": "1"}
        with pytest.raises(Forbidden):
            await gate.admit(req, GenerationRequest(request_id="r2", prompt="p", model="other"))

    asyncio.run(main())
