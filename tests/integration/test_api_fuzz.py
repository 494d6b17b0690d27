"""Property-based: any JSON body to any inference endpoint gets an answer, never a 5xx from our own code.

Hypothesis builds bodies with the fields each endpoint reads, holding values
of every JSON type (strings with lone UTF-16 surrogates, integers far past
64 bits, nested lists and objects); a real gateway with an echo worker
answers them. A 5xx would mean a client's bytes broke the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.gateway import OPEN_POLICY, GatewayProcess
from tests.support.inference import wait_healthy
from tests.support.worker import WorkerProcess

# Text of any code point, with lone UTF-16 surrogates common (they survive JSON as \\udXXX;
# two adjacent ones of the right kinds would pair up into one valid character instead).
PIECES = st.sampled_from(["\ud800", "\udfff", "a", " ", "é", "\x00", "💥", "\u2028"]) | st.characters(
    exclude_categories=()
)
ANY_TEXT = st.lists(PIECES, max_size=12).map("".join)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3), max_leaves=6
)
SMALL_INT = st.integers(min_value=-5, max_value=40) | st.integers() | JSON
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]) | JSON,
        "content": ANY_TEXT
        | st.lists(st.fixed_dictionaries({"type": st.just("text") | JSON, "text": ANY_TEXT | JSON}), max_size=2)
        | JSON,
    },
)
COMMON = {
    "model": st.just("default-model") | ANY_TEXT | JSON,
    "max_tokens": SMALL_INT,
    "max_completion_tokens": SMALL_INT,
    "temperature": st.floats(min_value=-1, max_value=3, allow_nan=False) | JSON,
    "top_p": st.floats(min_value=-1, max_value=2, allow_nan=False) | JSON,
    "priority": SMALL_INT,
    "seed": st.integers() | JSON,
    "stop": ANY_TEXT | st.lists(ANY_TEXT, max_size=3) | JSON,
    "stream": st.booleans() | JSON,
    "n": st.just(1) | JSON,
}
# Per endpoint: a valid body, and the fields it reads with what they may hold.
ENDPOINTS = {
    "/v1/inference": ({"prompt": "a b c", "max_tokens": 4}, {"prompt": ANY_TEXT | JSON, **COMMON}),
    "/v1/completions": (
        {"prompt": "a b c", "max_tokens": 4},
        {"prompt": ANY_TEXT | st.lists(ANY_TEXT, max_size=2) | JSON, **COMMON},
    ),
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "a b"}], "max_tokens": 4},
        {"messages": st.lists(MESSAGE, min_size=1, max_size=3) | JSON, **COMMON},
    ),
}


def bodies(base: dict, fields: dict) -> st.SearchStrategy[dict]:
    """A valid body with one field (or several) replaced: so odd values reach deep, not just the first check."""
    one = st.sampled_from(sorted(fields)).flatmap(lambda name: fields[name].map(lambda v: {**base, name: v}))
    several = st.fixed_dictionaries({}, optional=fields).map(lambda extra: {**base, **extra})
    return one | several


@pytest.fixture(scope="module")
def gateway_with_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("fuzz")
    worker = WorkerProcess(["--engine", "echo", "--max-concurrency", "16"], folder / "worker.log")
    (folder / "blocklist.json").write_text('{"blocked_domains": []}')
    gw = GatewayProcess(
        [*OPEN_POLICY, "--blocklist", str(folder / "blocklist.json"), "-worker-addrs", worker.addr], folder / "gw.log"
    )
    wait_healthy(gw)
    yield gw
    gw.stop()
    worker.stop()


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_any_json_body_gets_a_4xx_or_an_answer(gateway_with_worker: GatewayProcess, path: str) -> None:
    gw = gateway_with_worker
    session = requests.Session()

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=bodies(*ENDPOINTS[path]), escaped=st.booleans())
    def check(body: dict, escaped: bool) -> None:
        # A lone surrogate travels as \\udXXX (ensure_ascii), or as the three
        # UTF-8-style bytes a careless encoder writes (ED A0 80): both are refused.
        text = json.dumps(body, ensure_ascii=escaped)
        data = text.encode("utf-8", "surrogatepass")
        r = session.post(f"{gw.proxy}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code < 500, (r.status_code, r.text[:300], body)

    check()
    assert "Traceback" not in gw.log() and "handler failed" not in gw.log()
