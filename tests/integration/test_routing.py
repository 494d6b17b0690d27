"""Inference routing end to end: one scheduler across processes, coalescing, model routes, prefix affinity.

Real gateways (`--workers 2` where the point is crossing processes), real
echo workers, real HTTP clients over new connections. Order is observed, not
slept for: a worker's Health counters, the gateway's metrics and log lines.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.support.gateway import GatewayProcess
from tests.support.inference import events, wait_healthy
from tests.support.waiting import metric, wait_for
from tests.support.worker import WorkerProcess

CLOSE = {"Connection": "close"}  # a new connection per request: each may land on either process


def post(gw: GatewayProcess, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{gw.proxy}{path}", json=body, headers=CLOSE, timeout=60, **kw)


def tokens_of(resp: requests.Response) -> list[str]:
    return [json.loads(d).get("token", "") for e, d in events(resp) if e == "message"]


class Stream:
    """A streaming /v1/inference call in a thread: when its first token came, and all it got."""

    def __init__(self, gw: GatewayProcess, body: dict) -> None:
        self.first_at = 0.0
        self.tokens: list[str] = []
        self.request_ids: set[str] = set()
        self.status = 0
        self._thread = threading.Thread(target=self._run, args=(gw, body), daemon=True)
        self._thread.start()

    def _run(self, gw: GatewayProcess, body: dict) -> None:
        with post(gw, "/v1/inference", body, stream=True) as r:
            self.status = r.status_code
            for event, data in events(r):
                if event != "message":
                    continue
                d = json.loads(data)
                if not self.first_at:
                    self.first_at = time.monotonic()
                self.request_ids.add(d["request_id"])
                if "token" in d:
                    self.tokens.append(d["token"])

    def join(self) -> Stream:
        self._thread.join(60)
        assert not self._thread.is_alive()
        return self


def test_one_scheduler_never_offers_a_worker_more_than_its_capacity(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "2", "--latency", "0.02")
    # --spread-above 0: each connection stays in the process the kernel gave it to, so both take requests.
    gw = start_gateway("--workers", "2", "--spread-above", "0", "-worker-addrs", w.addr)
    wait_healthy(gw)

    def one(i: int) -> tuple[int, str]:
        r = post(gw, "/v1/inference", {"prompt": f"p{i} a b c d", "max_tokens": 6})
        return r.status_code, r.text

    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    assert [status for status, _ in results] == [200] * 30
    assert all('"finished":true' in text for _, text in results)
    # Both processes took connections: the other one moved its clients to the owner.
    wait_for(lambda: metric(gw, "inference_handoffs_total", result="moved") > 0, "connections handed over")
    health = w.health()
    assert health.generations_started == 30
    # Offered (running + waiting in the engine), not just running: a gateway
    # with a queue per process offered up to twice the capacity.
    assert health.peak_calls == 2, health.peak_calls


def test_priority_order_holds_across_processes(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "1", "--latency", "0.05")
    gw = start_gateway("--workers", "2", "--spread-above", "0", "-worker-addrs", w.addr, "--coalesce", "off")
    wait_healthy(gw)
    blocker = Stream(gw, {"prompt": "block " * 20, "max_tokens": 21})
    wait_for(lambda: w.health().active_sequences == 1, "the blocker to run")
    lows = [Stream(gw, {"prompt": f"low{i} x", "max_tokens": 3, "priority": 1}) for i in range(5)]
    wait_for(lambda: metric(gw, "inference_queue_depth") == 5, "five low requests queued")
    highs = [Stream(gw, {"prompt": f"high{i} x", "max_tokens": 3, "priority": 9}) for i in range(5)]
    wait_for(lambda: metric(gw, "inference_queue_depth") == 10, "five high requests queued")
    for s in [blocker, *lows, *highs]:
        s.join()
        assert s.status == 200
    assert max(s.first_at for s in highs) < min(s.first_at for s in lows)


# ---- coalescing ---------------------------------------------------------------

PROMPT = " ".join(f"w{i}" for i in range(30))


def test_identical_greedy_requests_share_one_generation(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "4", "--latency", "0.1")
    gw = start_gateway("--workers", "2", "--spread-above", "0", "-worker-addrs", w.addr)
    wait_healthy(gw)
    body = {"prompt": PROMPT, "max_tokens": 31, "temperature": 0}
    gate = threading.Barrier(40)

    def one(_: int) -> tuple[int, str, list[str]]:
        gate.wait()
        r = post(gw, "/v1/inference", body)
        data = [json.loads(d) for e, d in events(r) if e == "message"]
        return r.status_code, r.headers["X-Request-ID"], [d.get("token", "") for d in data]

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    expected = ["[default-model] "] + [f"w{i} " for i in range(30)] + [""]
    assert all(status == 200 and toks == expected for status, _, toks in results)
    assert len({rid for _, rid, _ in results}) == 40  # each client its own request id
    assert w.health().generations_started == 1
    wait_for(lambda: metric(gw, "inference_coalesced_requests_total") == 39, "39 coalesced requests counted")


def test_a_late_joiner_first_gets_what_was_generated(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.05")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    body = {"prompt": PROMPT, "max_tokens": 31, "temperature": 0}
    with post(gw, "/v1/inference", body, stream=True) as first:
        lines = first.iter_lines()
        got = [line for line in (next(lines) for _ in range(10)) if line.startswith(b"data:")]
        assert len(got) >= 4  # a few tokens are out before the second client arrives
        late = post(gw, "/v1/inference", body)
        rest = list(lines)
    late_tokens = tokens_of(late)
    assert late_tokens[:3] == ["[default-model] ", "w0 ", "w1 "] and len(late_tokens) == 32
    first_tokens = [json.loads(line[6:]).get("token", "") for line in got + rest if line.startswith(b"data:")]
    assert first_tokens == late_tokens
    assert w.health().generations_started == 1


def test_sampling_requests_coalesce_only_with_the_same_seed(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "8", "--latency", "0.1")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    for body, generations in (
        ({"prompt": "a b c d e", "temperature": 0.7}, 3),  # sampling without a seed: three answers
        ({"prompt": "a b c d e", "temperature": 0.7, "seed": 5}, 1),
    ):
        before = w.health().generations_started
        gate = threading.Barrier(3)

        def one(_: int, body: dict = body, gate: threading.Barrier = gate) -> int:
            gate.wait()
            return post(gw, "/v1/inference", body).status_code

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(one, range(3))) == [200] * 3
        assert w.health().generations_started - before == generations, body


def test_one_client_leaving_disturbs_nobody_and_the_last_cancels(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.05")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    body = {"prompt": PROMPT, "max_tokens": 31, "temperature": 0}
    leaver = post(gw, "/v1/inference", body, stream=True)
    stayer = Stream(gw, body)
    wait_for(lambda: stayer.tokens, "the second client to get tokens")
    leaver.close()
    assert len(stayer.join().tokens) == 31
    health = w.health()
    assert (health.generations_started, health.generations_cancelled) == (1, 0)

    first = post(gw, "/v1/inference", body, stream=True)
    second = post(gw, "/v1/inference", body, stream=True)
    for r in (first, second):
        next(r.iter_lines())
    assert w.health().generations_started == 2  # the two share the second generation
    first.close()
    second.close()
    wait_for(lambda: w.health().generations_cancelled == 1, "the worker to see the cancel")


def test_the_reading_client_leaving_mid_read_disturbs_nobody(start_gateway, start_worker) -> None:
    """A generation's only client reads the worker stream in its own task; if it leaves
    while a joiner waits on that read, the read completes and the joiner gets everything."""
    w = start_worker("--latency", "0.05", "--prefill-ms-per-token", "30")  # ~1 s before the first token
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    body = {"prompt": PROMPT, "max_tokens": 31, "temperature": 0}
    payload = json.dumps(body).encode()
    leaver = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    leaver.sendall(
        b"POST /v1/inference HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    wait_for(lambda: w.health().active_sequences == 1, "the generation to start")
    stayer = Stream(gw, body)
    wait_for(lambda: metric(gw, "inference_coalesced_requests_total") == 1, "the second client to join")
    leaver.close()  # before the first token: the leaver's task is in the middle of the read
    left_at = time.monotonic()
    assert len(stayer.join().tokens) == 31
    assert stayer.first_at > left_at, "the first token came before the leaver left: nothing was tested"
    health = w.health()
    assert (health.generations_started, health.generations_cancelled) == (1, 0)


def test_a_shared_generation_runs_at_its_most_urgent_clients_priority(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "1", "--latency", "0.05")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    blocker = Stream(gw, {"prompt": "block " * 20, "max_tokens": 21, "temperature": 0.7})
    wait_for(lambda: w.health().active_sequences == 1, "the blocker to run")
    low = Stream(gw, {"prompt": "other x", "max_tokens": 3, "priority": 3})
    wait_for(lambda: metric(gw, "inference_queue_depth") == 1, "the low request queued")
    shared = {"prompt": "shared x", "max_tokens": 3, "temperature": 0}
    early = Stream(gw, {**shared, "priority": 1})
    wait_for(lambda: metric(gw, "inference_queue_depth") == 2, "the shared generation queued")
    urgent = Stream(gw, {**shared, "priority": 9})  # joins it, and raises it above `low`
    wait_for(lambda: metric(gw, "inference_coalesced_requests_total") == 1, "the urgent client to join")
    for s in (blocker, low, early, urgent):
        assert s.join().status == 200
    assert early.first_at < low.first_at and urgent.first_at < low.first_at
    assert early.tokens == urgent.tokens == ["[default-model] ", "shared ", "x "]


# ---- model routes -------------------------------------------------------------------

ROUTES = """
[models.small]
serve = ["small-model"]
[models.large]
serve = ["large-model", "small-model"]
max_tokens = 5
[models.auto]
small = "small"
large = "large"
large_if_prompt_tokens_over = 50
large_if_max_tokens_over = 100
large_if_matches = ['(?i)\\bprove\\b']
"""


def complete(gw: GatewayProcess, model: str, prompt: str, **extra) -> requests.Response:
    return post(gw, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8, **extra})


def test_routes_auto_chooser_caps_fallback_and_reload(start_gateway, start_worker, tmp_path: Path) -> None:
    small = start_worker("--model", "small-model")
    large = start_worker("--model", "large-model")
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES)
    gw = start_gateway("--workers", "2", "-worker-addrs", f"{small.addr},{large.addr}", "--routes", str(routes))
    wait_healthy(gw, 2)

    cases = [
        ("hello there", {}, "small-model"),
        ("word " * 60, {}, "large-model"),  # 300 bytes ≈ 75 tokens > 50
        ("hello there", {"max_tokens": 200}, "large-model"),
        ("please Prove it", {}, "large-model"),
    ]
    for prompt, extra, model in cases:
        r = complete(gw, "auto", prompt, **extra)
        assert r.status_code == 200, r.text
        assert r.headers["X-Proxygate-Route"] == "auto" and r.headers["X-Proxygate-Model"] == model, prompt
        body = r.json()
        assert body["model"] == model
        if model == "large-model":
            assert body["usage"]["completion_tokens"] <= 5  # the large route's cap
    wait_for(
        lambda: metric(gw, "inference_routed_total", route="auto", model="large-model", reason="large") == 3,
        "three auto→large decisions counted",
    )
    wait_for(
        lambda: metric(gw, "inference_routed_total", route="auto", model="small-model", reason="small") == 1,
        "the auto→small decision counted",
    )
    gw.wait_log('"route":"auto","model":"large-model"')

    ids = [m["id"] for m in requests.get(f"{gw.proxy}/v1/models", timeout=5).json()["data"]]
    assert ids == ["auto", "large", "small", "large-model", "small-model"]
    missing = complete(gw, "nope", "x")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]

    # Direct use of a worker model still works, and says so.
    r = complete(gw, "small-model", "x y")
    assert r.headers["X-Proxygate-Route"] == "small-model" and r.json()["model"] == "small-model"

    # The large model's worker goes away: "large" falls back to its second model.
    large.stop()
    wait_for(lambda: metric(gw, "inference_worker_healthy", worker_id=large.addr) == 0, "the large worker ejected")
    r = complete(gw, "large", "x y")
    assert r.status_code == 200 and r.headers["X-Proxygate-Model"] == "small-model", r.text
    wait_for(
        lambda: metric(gw, "inference_routed_total", route="large", model="small-model", reason="fallback") == 1,
        "the fallback counted",
    )

    # Reload on change (every process), and a broken file keeps the old table.
    routes.write_text(ROUTES + '[models.tiny]\nserve = ["small-model"]\n')
    gw.wait_log("routes reloaded")
    wait_for(lambda: complete(gw, "tiny", "x").status_code == 200, "the new route to serve")
    routes.write_text("[models.tiny\n")
    gw.wait_log("routes reload failed")
    assert all(complete(gw, "tiny", "x").status_code == 200 for _ in range(4))
    routes.write_text(ROUTES)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: complete(gw, "tiny", "x").status_code == 404, "the reloaded table without tiny")


def test_a_broken_routes_file_stops_the_start(start_gateway, tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('[models.auto]\nsmall = "a"\nlarge = "b"\n')
    with pytest.raises(RuntimeError, match="gateway exited with 1") as failed:
        start_gateway("--routes", str(routes))
    assert "cannot load routes" in str(failed.value) and "'a' is not a route" in str(failed.value)


# ---- prefix affinity --------------------------------------------------------------------


def test_requests_sharing_a_prefix_go_where_it_is_cached(start_gateway, tmp_path: Path) -> None:
    workers = [
        WorkerProcess(["--engine", "echo", "--prefix-cache-slots", "2"], tmp_path / f"w{i}.log") for i in range(3)
    ]
    try:
        gw = start_gateway("-worker-addrs", ",".join(w.addr for w in workers))
        wait_healthy(gw, 3)
        prefixes = [" ".join(f"g{g}w{i}" for i in range(60)) for g in range(3)]
        order = [g for g in range(3) for _ in range(5)]
        random.Random(7).shuffle(order)
        cached = []
        for n, g in enumerate(order):
            r = complete(gw, "default-model", f"{prefixes[g]} q{n}", max_tokens=2)
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert sum(c >= 60 for c in cached) == 12, cached  # every request but each group's first
        assert sorted(w.health().prefix_cache_queries for w in workers) == [5, 5, 5]
    finally:
        for w in workers:
            w.stop()


def test_the_inference_plane_comes_back_when_its_process_dies(start_gateway, start_worker) -> None:
    w = start_worker()
    gw = start_gateway("--workers", "2", "-worker-addrs", w.addr)
    owners = lambda: re.findall(r"process (\d+) owns the inference plane", gw.log())  # noqa: E731
    wait_for(lambda: len(owners()) == 1, "the owner's log line")
    wait_healthy(gw)
    os.kill(int(owners()[0]), signal.SIGKILL)
    wait_for(lambda: len(owners()) == 2, "a new process owning the inference plane")

    def all_served() -> bool:
        return all(post(gw, "/v1/inference", {"prompt": "a b", "max_tokens": 3}).status_code == 200 for _ in range(8))

    wait_for(all_served, "inference through both processes again", timeout=20)
