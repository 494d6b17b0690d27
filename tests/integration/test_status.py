"""The live status page: /status.json from any serving process, and /status in a real headless browser.

Real gateways (`--workers 2`: the data must be the inference plane owner's,
whichever process answers), real echo workers, and Debian's chromium running
the page's own script against the gateway.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import requests

from tests.conftest import require_binary
from tests.integration.test_routing import Stream
from tests.integration.test_safety import raw
from tests.support.gateway import GatewayProcess
from tests.support.inference import wait_healthy
from tests.support.waiting import wait_for

CLOSE = {"Connection": "close"}  # a new connection each time: either process may answer


def status(gw: GatewayProcess) -> dict:
    r = requests.get(f"{gw.proxy}/status.json", headers=CLOSE, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    return r.json()


def refused_port() -> int:
    """A loopback port nothing listens on (a proxied request to it is a 502)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_get(gw: GatewayProcess, url: bytes) -> bytes:
    """A plain-HTTP GET through the gateway on a new connection (either process may take it)."""
    return raw(gw, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % url)


def test_status_json_shows_workers_queue_by_priority_and_totals(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "1", "--latency", "0.05")
    # --spread-above 0: each connection stays in the process the kernel gave it to, so both take requests.
    gw = start_gateway("--workers", "2", "--spread-above", "0", "-worker-addrs", w.addr, "--coalesce", "off")
    wait_healthy(gw)
    blocker = Stream(gw, {"prompt": "block " * 30, "max_tokens": 31})
    wait_for(lambda: w.health().active_sequences == 1, "the blocker to run")
    lows = [Stream(gw, {"prompt": f"low{i} x", "max_tokens": 2, "priority": 1}) for i in range(2)]
    highs = [Stream(gw, {"prompt": f"high{i} x", "max_tokens": 2, "priority": 9}) for i in range(3)]
    # Asked of both processes in turn: each answer is the owner's one queue.
    wait_for(lambda: status(gw)["queue"]["depth"] == 5, "five requests queued")
    for _ in range(4):
        s = status(gw)
        assert s["queue"]["by_model"] == {"default-model": {"high": 3, "medium": 0, "low": 2}}
        (worker,) = s["workers"]
        assert worker["address"] == w.addr and worker["state"] == "ready" and worker["healthy"] is True
        assert worker["engine"] == "echo" and worker["capacity"] == 1 and worker["active"] == 1
        assert s["processes"] == 2 and s["in_flight"] == 6
    for stream in [blocker, *lows, *highs]:
        stream.join()
        assert stream.status == 200
    # Counters are every process's (merged within a second), and rates follow.
    wait_for(lambda: status(gw)["totals"]["inference_requests"] == 6, "six finished requests counted")
    s = status(gw)
    assert s["totals"]["tokens"] == 31 + 5 * 2  # each request ran to its max_tokens
    assert s["queue"]["depth"] == 0 and s["workers"][0]["active"] == 0
    wait_for(lambda: status(gw)["rates"]["inference_requests"] > 0, "a request rate")


def test_recent_errors_come_from_every_process(start_gateway) -> None:
    gw = start_gateway("--workers", "2", "--spread-above", "0", "--http-ports", "*")
    port = refused_port()
    for i in range(6):  # new connections: both processes answer some
        assert proxy_get(gw, b"http://127.0.0.1:%d/missing-%d" % (port, i)).startswith(b"HTTP/1.1 502")
    requests.get(f"{gw.proxy}/healthz", timeout=5)  # a success is not an error
    wait_for(lambda: len(status(gw)["recent_errors"]) == 6, "six recent errors")
    errors = status(gw)["recent_errors"]
    assert sorted(e["path"] for e in errors) == [f"/missing-{i}" for i in range(6)]
    for e in errors:
        assert e["status"] == 502 and e["method"] == "GET" and e["host"] == f"127.0.0.1:{port}"
        assert "refused" in e["error"] and e["client_ip"] == "127.0.0.1" and re.fullmatch(r"[0-9a-f]+", e["request_id"])
    assert [e["time"] for e in errors] == sorted((e["time"] for e in errors), reverse=True)  # newest first
    assert status(gw)["totals"]["errors_5xx"] == 6


def test_inference_failure_is_a_recent_error_with_its_reason(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "1")
    gw = start_gateway("-worker-addrs", w.addr, "--health-interval", "0.2")
    wait_healthy(gw)
    w.stop()
    wait_for(lambda: status(gw)["workers"][0]["state"] == "down", "the worker to be seen down")
    r = requests.post(f"{gw.proxy}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=30)
    assert r.status_code == 503
    (error,) = status(gw)["recent_errors"]
    assert error["status"] == 503 and error["path"] == "/v1/completions"
    assert error["error"] == r.json()["error"]["message"]


def chromium_dom(url: str, profile: Path, virtual_ms: int = 4000) -> str:
    """The page's DOM after its script ran for `virtual_ms` of (virtual) time, in headless chromium."""
    chromium = require_binary("chromium", "chromium")
    out = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={virtual_ms}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        timeout=90,
        check=True,
    )
    return out.stdout.decode()


def test_status_page_renders_and_updates_itself_in_a_browser(start_gateway, start_worker, tmp_path) -> None:
    w = start_worker("--max-concurrency", "3")
    gw = start_gateway("--workers", "2", "-worker-addrs", w.addr, "--http-ports", "*")
    wait_healthy(gw)
    page = requests.get(f"{gw.proxy}/status", timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    # Self-contained: nothing for the browser to fetch but /status.json.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)
    # A client-chosen path is shown as text, never as markup.
    assert proxy_get(gw, b"http://127.0.0.1:%d/<i>injected</i>" % refused_port()).startswith(b"HTTP/1.1 502")
    wait_for(lambda: len(status(gw)["recent_errors"]) == 1, "the error to reach the status data")
    dom = chromium_dom(f"{gw.proxy}/status", tmp_path / "chromium")
    updates = re.search(r'data-updates="(\d+)"', dom)
    assert updates and int(updates.group(1)) >= 3, "the page did not refresh itself every second"
    assert w.addr in dom and ">ready<" in dom and "0 / 3" in dom
    assert "&lt;i&gt;injected&lt;/i&gt;" in dom and "<i>injected</i>" not in dom
    assert "connection refused" in dom and "2 processes" in dom
    assert re.search(r'<span id="conn" class="">live', dom), "the page lost the gateway"


def test_status_json_is_exempt_from_the_rate_limit(start_gateway) -> None:
    gw = start_gateway("-rate-limit", "1", "-rate-burst", "1")
    codes = {requests.get(f"{gw.proxy}/status.json", timeout=5).status_code for _ in range(5)}
    assert codes == {200}
    assert json.loads(requests.get(f"{gw.proxy}/status.json", timeout=5).text)["workers"] == []
