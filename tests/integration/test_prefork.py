"""`--workers N`: several processes on one listener, one rate-limit budget, one /metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import require_binary
from tests.support.gateway import BackgroundGet, GatewayProcess, stop_with_requests_queued
from tests.support.origin import Origin
from tests.support.waiting import metric, wait_for
from tests.support.worker import WorkerProcess


def children(gw: GatewayProcess) -> set[int]:
    pid = gw.proc.pid
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


# Where a test needs both processes to serve, `--spread-above 0` keeps the kernel's
# spread of new connections (the default gathers a light load in process 0).
SPREAD = ("--spread-above", "0")


def fresh_get(gw: GatewayProcess, url: str) -> requests.Response:
    """One request on a new connection (each may land on another process)."""
    with requests.Session() as s:
        return s.get(url, proxies={"http": gw.proxy}, timeout=10, headers={"Connection": "close"})


def process_of(response: requests.Response) -> str:
    return response.headers["X-Request-ID"][:10]  # the per-process id prefix


def test_processes_share_the_port_with_distinct_request_ids(start_gateway, origin: Origin) -> None:
    gw = start_gateway("--workers", "2", *SPREAD)
    assert len(children(gw)) == 2
    responses = [fresh_get(gw, f"{origin.url}/hello") for _ in range(40)]
    assert all(r.status_code == 200 and r.text == "hello" for r in responses)
    ids = [r.headers["X-Request-ID"] for r in responses]
    assert len(set(ids)) == len(ids)
    assert len({process_of(r) for r in responses}) == 2, "the kernel should spread 40 connections over both"


def test_one_rate_limit_budget_across_processes(start_gateway, origin: Origin) -> None:
    gw = start_gateway("--workers", "2", *SPREAD, "-rate-limit", "60", "-rate-burst", "10")
    responses = [fresh_get(gw, f"{origin.url}/hello") for _ in range(30)]
    allowed = sum(r.status_code == 200 for r in responses)
    # The burst, plus at most what drains (1/s) while the 30 requests run.
    assert 10 <= allowed <= 12, [r.status_code for r in responses]
    assert {r.status_code for r in responses} == {200, 429}
    assert len({process_of(r) for r in responses}) == 2


def test_metrics_cover_every_process(start_gateway, origin: Origin) -> None:
    """A scrape counts every request answered before it, whichever process answered either:
    the answering process asks the other to publish first (a scrape read the others' files of
    up to a second ago before)."""
    gw = start_gateway("--workers", "2", *SPREAD)
    pattern = re.compile(r'^proxy_requests_total\{method="GET",status="202"\} (\S+)$', re.M)
    responses, counted, scraped_by = [], [], set()
    for _ in range(30):
        responses.append(fresh_get(gw, f"{origin.url}/status/202"))
        scrape = requests.get(f"{gw.proxy}/metrics", headers={"Connection": "close"}, timeout=10)
        scraped_by.add(process_of(scrape))
        match = pattern.search(scrape.text)
        counted.append(float(match.group(1)) if match else 0.0)
    assert all(r.status_code == 202 for r in responses)
    assert len({process_of(r) for r in responses}) == 2 and len(scraped_by) == 2
    assert counted == [float(n) for n in range(1, 31)]
    # Both processes wrote access-log lines to one stdout: none cut into another.
    assert gw.stop() == 0
    entries = [json.loads(line) for line in gw.log().splitlines()]
    assert sum(e.get("msg") == "request" and e.get("status") == 202 for e in entries) == 30


def test_sigterm_drains_every_process(start_gateway, origin: Origin) -> None:
    gw = start_gateway("--workers", "2", "-shutdown-timeout", "20s")
    pids = children(gw)
    download = BackgroundGet(gw, f"{origin.url}/slow/10/3")
    download.wait_started()
    gw.signal(signal.SIGTERM)
    result = download.join()
    assert result.get("chunks") == 10, result
    assert gw.proc.wait(20) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_requests_waiting_in_every_accept_queue_at_a_stop_are_answered(start_gateway) -> None:
    """Each process takes what waits for it before its listener closes; connections one passed
    to process 0 are adopted by it, not dropped with the stream that carried them."""
    gw = start_gateway("--workers", "2", *SPREAD)
    results = stop_with_requests_queued(gw, [gw.proc.pid, *children(gw)], 40)
    assert results == [200] * 40
    assert gw.proc.wait(20) == 0


def test_a_killed_process_is_replaced(start_gateway, origin: Origin) -> None:
    gw = start_gateway("--workers", "2", *SPREAD)
    before = children(gw)
    victim = min(before)
    subprocess.run(["kill", "-9", str(victim)], check=True)
    gw.wait_log(r"exited with -9; starting another")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (len(children(gw)) != 2 or victim in children(gw)):
        time.sleep(0.1)
    after = children(gw)
    assert len(after) == 2 and victim not in after
    # The new process serves: new connections are answered by both processes again.
    wait_for(
        lambda: len({process_of(fresh_get(gw, f"{origin.url}/hello")) for _ in range(8)}) == 2,
        "both processes answering",
    )
    responses = [fresh_get(gw, f"{origin.url}/hello") for _ in range(20)]
    assert all(r.status_code == 200 for r in responses)
    gw.assert_alive()


def test_a_process_that_cannot_start_stops_them_all(tmp_path: Path) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "proxygate", "gateway", "--listen", "127.0.0.1:0", "--workers", "2"]
    argv += ["-limiter", "redis", "-redis-addr", f"127.0.0.1:{port}", "--blocklist", str(tmp_path / "none.json")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "while starting; stopping" in out.stderr


def test_a_reload_signal_while_the_processes_start_is_held_for_them(tmp_path: Path) -> None:
    """SIGHUP (and SIGTERM) reach a serving process that may not have its handlers yet: the
    supervisor relays them as they come. Held until the process has them, it reloads;
    delivered before, SIGHUP's default action ended the process (and, while starting, the
    gateway)."""
    log_path, blocklist = tmp_path / "gateway.log", tmp_path / "blocklist.json"
    blocklist.write_text('{"blocked_domains": []}')
    argv = [sys.executable, "-m", "proxygate", "gateway", "--listen", "127.0.0.1:0", "--workers", "2"]
    argv += ["--blocklist", str(blocklist)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        forked: set[int] = set()
        deadline = time.monotonic() + 30
        while len(forked) < 2 and time.monotonic() < deadline and proc.poll() is None:
            forked = {int(p) for p in children_file.read_text().split()}
        assert len(forked) == 2, log_path.read_text()
        for pid in forked:  # each still starting: importing, building its gateway
            os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "listening on" in log_path.read_text() or proc.poll() is not None, "listening on")
        assert proc.poll() is None, log_path.read_text()
        text = log_path.read_text()
        assert "exited with" not in text
        # The held signal ran the reload once the process could (process 0 logs it).
        wait_for(lambda: "blocklist reloaded" in log_path.read_text(), "the held reload")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()


def test_no_writable_temporary_folder_serves_with_one_process(start_gateway, origin: Origin, tmp_path: Path) -> None:
    """The processes share a folder for their sockets and metrics; on a read-only file system
    with no writable temporary folder the default (one process per CPU) serves with one."""
    patch = tmp_path / "site"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import tempfile\n\n"
        "def _refuse(*args, **kwargs):\n"
        "    raise OSError(30, 'Read-only file system')\n\n"
        "tempfile.mkdtemp = _refuse\n"
    )
    path = os.pathsep.join(filter(None, [str(patch), os.environ.get("PYTHONPATH", "")]))
    gw = start_gateway("--workers", "2", env={"PYTHONPATH": path})
    gw.wait_log("cannot make a runtime folder for 2 serving processes .*Read-only file system.*; serving with one")
    responses = [fresh_get(gw, f"{origin.url}/hello") for _ in range(10)]
    assert [r.status_code for r in responses] == [200] * 10
    assert len({process_of(r) for r in responses}) == 1
    assert not children(gw)


def test_a_temporary_folder_too_deep_for_unix_sockets_is_not_used(
    start_gateway, origin: Origin, tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 100)  # a socket's path holds at most 107 bytes
    deep.mkdir()
    gw = start_gateway("--workers", "2", *SPREAD, env={"TMPDIR": str(deep)})
    responses = [fresh_get(gw, f"{origin.url}/hello") for _ in range(20)]
    assert [r.status_code for r in responses] == [200] * 20
    assert len(children(gw)) == 2 and len({process_of(r) for r in responses}) == 2


def test_tls_listener_in_every_process(
    start_gateway, server_cert_files: tuple[str, str], ca_file: str, origin: Origin
) -> None:
    pem, key = server_cert_files
    gw = start_gateway("--workers", "2", "-proto", "https", "-pem", pem, "-key", key)
    curl = require_binary("curl", "curl")
    prefixes = set()
    for _ in range(16):
        out = subprocess.run(
            [
                curl,
                "-sS",
                "-D",
                "-",
                "--proxy-cacert",
                ca_file,
                "-x",
                f"https://127.0.0.1:{gw.port}",
                f"{origin.url}/hello",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0 and out.stdout.endswith("hello"), out.stderr
        prefixes.add(re.search(r"(?im)^x-request-id: (\S{10})", out.stdout).group(1))  # type: ignore[union-attr]
    assert len(prefixes) == 2


def test_inference_through_every_process(start_gateway, tmp_path: Path) -> None:
    worker = WorkerProcess(["--engine", "echo"], tmp_path / "worker.log")
    try:
        gw = start_gateway("--workers", "2", "-worker-addrs", worker.addr)
        deadline = time.monotonic() + 15
        while True:  # each process learns the worker's health by itself
            responses = [
                requests.post(
                    f"{gw.proxy}/v1/inference",
                    json={"prompt": "one two", "max_tokens": 5},
                    headers={"Connection": "close"},
                    timeout=30,
                )
                for _ in range(16)
            ]
            if all(r.status_code == 200 for r in responses) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [r.status_code for r in responses] == [200] * 16
        assert all('"finished":true' in r.text.replace(" ", "") and "one " in r.text for r in responses)
        # The process that does not own the inference plane passed its clients' connections to the owner.
        wait_for(lambda: metric(gw, "inference_handoffs_total", result="moved") > 0, "connections handed over")
    finally:
        worker.stop()
