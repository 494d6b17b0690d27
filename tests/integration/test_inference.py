"""The inference plane end to end: real gateway, real echo worker processes, real HTTP clients."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
import requests

from tests.support.gateway import GatewayProcess
from tests.support.inference import events, infer, wait_healthy
from tests.support.waiting import metric, wait_for
from tests.support.worker import SeedWorker


def test_sse_format(start_gateway, start_worker) -> None:
    w = start_worker()
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    r = infer(gw, {"prompt": "hello big world", "max_tokens": 10}, headers={"X-Request-ID": "rid-1"}, stream=True)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/event-stream" and r.headers["X-Request-ID"] == "rid-1"
    got = events(r)
    assert [e for e, _ in got] == ["message"] * 5
    data = [json.loads(d) for _, d in got]
    assert data[0] == {"request_id": "rid-1", "token": "[default-model] ", "token_count": 1}
    assert [d["token"] for d in data[:4]] == ["[default-model] ", "hello ", "big ", "world "]
    assert data[4] == {"request_id": "rid-1", "finished": True, "token_count": 4}  # empty token omitted
    # max_tokens bounds the stream; the model name is echoed
    data = [
        json.loads(d) for _, d in events(infer(gw, {"prompt": "a b c d e", "max_tokens": 2, "model": "default-model"}))
    ]
    assert [d.get("token") for d in data] == ["[default-model] ", "a ", None]


@pytest.mark.parametrize(
    "body, needle",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"max_tokens": 5}', "prompt"),
        ('{"prompt": ""}', "prompt"),
        ('{"prompt": 5}', "prompt"),
        ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
        ('{"prompt": "x", "max_tokens": 100000}', "max_tokens"),
        ('{"prompt": "x", "max_tokens": "ten"}', "max_tokens"),
        ('{"prompt": "x", "temperature": -0.1}', "temperature"),
        ('{"prompt": "x", "temperature": 2.5}', "temperature"),
        ('{"prompt": "x", "temperature": true}', "temperature"),
        ('{"prompt": "x", "priority": 0}', "priority"),
        ('{"prompt": "x", "priority": 11}', "priority"),
        ('{"prompt": "x", "priority": 1.5}', "priority"),
        ('{"prompt": "x", "top_p": 2}', "top_p"),
        ('{"prompt": "x", "stop": [1]}', "stop"),
    ],
)
def test_validation_400(gateway: GatewayProcess, body: str, needle: str) -> None:
    r = requests.post(f"{gateway.proxy}/v1/inference", data=body, timeout=10)
    assert r.status_code == 400 and needle in r.text, r.text


def test_prompt_size_bounded(start_gateway, start_worker) -> None:
    gw = start_gateway("-worker-addrs", start_worker().addr, "--max-prompt-bytes", "1000")
    r = infer(gw, {"prompt": "x" * 1001})
    assert r.status_code == 400 and "prompt" in r.text
    r = requests.post(f"{gw.proxy}/v1/inference", data=b"{" + b" " * (2 << 20) + b"}", timeout=10)
    assert r.status_code == 413


def test_no_workers_is_503(gateway: GatewayProcess, start_gateway) -> None:
    r = infer(gateway, {"prompt": "hi"})
    assert r.status_code == 503 and "Retry-After" in r.headers and "no inference workers" in r.text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    gw = start_gateway("-worker-addrs", dead)
    r = infer(gw, {"prompt": "hi"})  # before or after the first health poll: no worker takes work
    assert r.status_code == 503 and "Retry-After" in r.headers


def test_unknown_model_404_names_available(start_gateway, start_worker) -> None:
    a = start_worker("--model", "small")
    b = start_worker("--model", "large")
    gw = start_gateway("-worker-addrs", f"{a.addr},{b.addr}")
    wait_healthy(gw, 2)
    r = infer(gw, {"prompt": "hi", "model": "huge"})
    assert r.status_code == 404 and "large, small" in r.text
    data = [json.loads(d) for _, d in events(infer(gw, {"prompt": "hi", "model": "large"}))]
    assert data[0]["token"] == "[large] "
    # default-model goes to any worker
    assert infer(gw, {"prompt": "hi"}).status_code == 200


def _first_token_times(gw: GatewayProcess, bodies: list[dict]) -> list[float]:
    """Send requests one after another, each once the one before is running or queued;
    the time each one's first token arrived."""
    times = [0.0] * len(bodies)

    def run(i: int, body: dict) -> None:
        with infer(gw, body, stream=True, timeout=60) as r:
            for line in r.iter_lines():  # one iterator: read the stream to its end
                if line.startswith(b"data: ") and not times[i]:
                    times[i] = time.monotonic()

    threads = []
    for i, body in enumerate(bodies):
        t = threading.Thread(target=run, args=(i, body))
        t.start()
        threads.append(t)
        if i == 0:
            wait_for(lambda: times[0], "the first request's first token")
        else:
            wait_for(lambda n=i: metric(gw, "inference_queue_depth") == n, f"{i} requests queued")
    for t in threads:
        t.join(60)
    return times


def test_priority_order(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.05", "--max-concurrency", "1")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    running = {"prompt": " ".join(["w"] * 30), "priority": 5}  # ~1.5 s on the worker
    lows = [{"prompt": "low", "priority": 1, "max_tokens": 2} for _ in range(5)]
    high = {"prompt": "high", "priority": 9, "max_tokens": 2}
    # All queued in a known order while the first one runs.
    times = _first_token_times(gw, [running, *lows, high])
    high_at, low_times = times[-1], times[1:-1]
    assert all(high_at < t for t in low_times), times
    assert low_times == sorted(low_times)  # FIFO within a priority


def test_capacity_respected(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.03", "--max-concurrency", "4")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    results: list[int] = []

    def run() -> None:
        results.append(len(events(infer(gw, {"prompt": "a b c d e f g h i j"}))))

    threads = [threading.Thread(target=run) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [12] * 12
    health = w.health()
    assert health.peak_active == 4 and health.max_concurrency == 4
    assert health.current_queue_size == 0  # the gateway never sent more than capacity


def test_fifty_concurrent_over_two_workers(start_gateway, start_worker) -> None:
    a = start_worker("--latency", "0.01", "--max-concurrency", "4")
    b = start_worker("--latency", "0.01", "--max-concurrency", "4")
    gw = start_gateway("-worker-addrs", f"{a.addr},{b.addr}")
    wait_healthy(gw, 2)
    ok: list[bool] = []

    def run(i: int) -> None:
        data = [json.loads(d) for _, d in events(infer(gw, {"prompt": f"req {i} x y"}, timeout=60))]
        ok.append(data[-1].get("finished") is True and data[-1]["token_count"] == 5)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert ok.count(True) == 50
    assert a.health().generations_started > 5 and b.health().generations_started > 5


def test_worker_killed_mid_run(start_gateway, start_worker) -> None:
    a = start_worker("--latency", "0.05", "--max-concurrency", "1")
    b = start_worker("--latency", "0.05", "--max-concurrency", "1")
    gw = start_gateway("-worker-addrs", f"{a.addr},{b.addr}", "--health-interval", "200ms")
    wait_healthy(gw, 2)
    outcomes: dict[int, list[tuple[str, str]]] = {}

    def run(i: int) -> None:
        outcomes[i] = events(infer(gw, {"prompt": " ".join(["t"] * 20)}, timeout=60))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # Two streams under way (a token each sent to its client), two waiting in the queue.
    wait_for(
        lambda: (
            metric(gw, "inference_queue_depth") == 2 and metric(gw, "inference_time_to_first_token_seconds_count") >= 2
        ),
        "two streams running and two queued",
    )
    a.kill()
    for t in threads:
        t.join(60)
    errors = [i for i, ev in outcomes.items() if ev and ev[-1][0] == "error"]
    finished = [
        i for i, ev in outcomes.items() if ev and ev[-1][0] == "message" and json.loads(ev[-1][1]).get("finished")
    ]
    assert len(errors) == 1, outcomes  # the one streaming on the killed worker
    assert len(finished) == 3, outcomes  # the others, queued ones included, finish on the survivor
    gw.assert_alive()
    # Restarted on the same port, the worker is re-admitted.
    a.port = int(a.addr.rsplit(":", 1)[1])
    a.start()
    wait_healthy(gw, 2)


def test_disconnect_cancels_generation(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.05")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    sock = gw.connect()
    body = json.dumps({"prompt": " ".join(["z"] * 100)}).encode()
    sock.sendall(b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"data: " in sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and w.health().generations_cancelled == 0:
        time.sleep(0.05)
    health = w.health()
    assert health.generations_cancelled == 1 and health.active_sequences == 0


def test_queued_request_removed_on_disconnect(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.05", "--max-concurrency", "1")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    blocker = threading.Thread(target=lambda: events(infer(gw, {"prompt": " ".join(["b"] * 20)})))
    blocker.start()
    wait_for(lambda: w.health().active_sequences == 1, "the blocker running")
    sock = gw.connect()
    body = json.dumps({"prompt": "never run"}).encode()
    sock.sendall(b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: metric(gw, "inference_queue_depth") == 1, "the second request queued")
    sock.close()
    blocker.join(30)
    # Dispatched, the second would still be in flight when the blocker's slot freed.
    wait_for(lambda: metric(gw, "inference_in_flight") == 0, "nothing in flight")
    assert w.health().generations_started == 1  # the queued one was dropped, never dispatched
    assert "inference_queue_depth 0.0" in requests.get(f"{gw.proxy}/metrics", timeout=5).text


def test_queue_full_503(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.1", "--max-concurrency", "1")
    gw = start_gateway("-worker-addrs", w.addr, "--max-queue", "2")
    wait_healthy(gw)
    threads = [
        threading.Thread(target=lambda: events(infer(gw, {"prompt": "a b c d e f"})), daemon=True) for _ in range(3)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: metric(gw, "inference_queue_depth") == 2, "one running and two queued")
    r = infer(gw, {"prompt": "one too many"})
    assert r.status_code == 503 and "queue is full" in r.text and r.headers["Retry-After"]
    for t in threads:
        t.join(30)


def test_shutdown_drains_streams(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.05")
    gw = start_gateway("-worker-addrs", w.addr, "-shutdown-timeout", "20s")
    wait_healthy(gw)
    result: dict[str, object] = {}

    def run() -> None:
        result["events"] = events(infer(gw, {"prompt": " ".join(["s"] * 30)}, timeout=30))

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: metric(gw, "inference_time_to_first_token_seconds_count") >= 1, "the stream under way")
    gw.signal(signal.SIGTERM)
    t.join(30)
    ev = result["events"]
    assert json.loads(ev[-1][1]).get("finished") is True and len(ev) == 32  # type: ignore[index,arg-type]
    assert gw.proc.wait(20) == 0


def test_seed_only_worker(start_gateway) -> None:
    seed = SeedWorker()
    try:
        gw = start_gateway("-worker-addrs", seed.addr)
        wait_healthy(gw)
        data = [json.loads(d) for _, d in events(infer(gw, {"prompt": "old school", "model": "anything"}))]
        assert [d.get("token") for d in data] == ["[anything] ", "old ", "school ", None]
        assert data[-1]["finished"] is True
        text = requests.get(f"{gw.proxy}/metrics", timeout=5).text
        assert f'inference_worker_capacity{{worker_id="{seed.addr}"}} 1.0' in text
    finally:
        seed.stop()


def test_inference_metrics(start_gateway, start_worker) -> None:
    w = start_worker()
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    events(infer(gw, {"prompt": "one two", "priority": 9}))
    text = requests.get(f"{gw.proxy}/metrics", timeout=5).text
    for needle in (
        'inference_requests_total{model="default-model",priority="high",status="success"} 1.0',
        'inference_tokens_total{model="default-model"} 3.0',
        "inference_time_to_first_token_seconds_bucket",
        "inference_queue_wait_seconds_bucket",
        "inference_request_duration_seconds_bucket",
        f'inference_worker_requests_total{{status="success",worker_id="{w.addr}"}} 1.0',
        "inference_processing_seconds_bucket",
        "inference_in_flight 0.0",
    ):
        assert needle in text, needle


def test_inference_timeout(start_gateway, start_worker) -> None:
    w = start_worker("--latency", "0.2", "--max-concurrency", "2")
    gw = start_gateway("-worker-addrs", w.addr, "-inference-timeout", "700ms")
    wait_healthy(gw)
    # Mid-stream: the deadline ends the stream with an error event, and the worker stops.
    ev = events(infer(gw, {"prompt": " ".join(["slow"] * 30)}))
    assert ev[-1] == ("error", "inference timed out") and 1 <= len(ev) - 1 <= 4, ev
    # Before the first token (one token takes 0.2 s; the whole budget is used up queued behind two others).
    blockers = [threading.Thread(target=lambda: events(infer(gw, {"prompt": " ".join(["b"] * 30)}))) for _ in range(2)]
    for t in blockers:
        t.start()
    wait_for(lambda: w.health().active_sequences == 2, "both blockers running")
    r = infer(gw, {"prompt": "late"})
    assert r.status_code in (503, 504), r.text
    for t in blockers:
        t.join(30)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and w.health().active_sequences:
        time.sleep(0.05)
    assert w.health().active_sequences == 0


def test_a_finished_generation_is_never_cancelled_at_the_worker(start_gateway, start_worker) -> None:
    """A worker call that delivered its finished message ends by itself. The gateway cancelled it
    anyway, and when that cancel reached the worker before its handler returned, the worker
    counted a cancelled generation (a worker cannot tell whether its caller had the last message).
    Both paths: a request alone, and one that shares a generation (the coalescer's pump)."""
    w = start_worker("--latency", "0", "--max-concurrency", "4")
    gw = start_gateway("-worker-addrs", w.addr)
    wait_healthy(gw)
    for i in range(40):
        body = {"prompt": f"question {i}", "max_tokens": 2}
        # temperature 0.7 without a seed is never coalesced; 0 is, so it runs through the pump.
        assert infer(gw, {**body, "temperature": 0.7 if i % 2 else 0}).status_code == 200
    health = w.health()
    assert (health.generations_started, health.generations_cancelled) == (40, 0)
