"""A mixed soak: proxy traffic, tunnels, inference streams, clients leaving early and garbage,
for a fixed time, with the gateway's memory (RSS of every process) and open file
descriptors sampled throughout. After a warm-up, neither may keep growing."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from tests.support.gateway import OPEN_POLICY
from tests.support.origin import EchoTcpServer, Origin

from .harness import GatewayProcess, Report, WorkerProcess, exchange, fd_count, rss_kib, tree_pids, wait_until

KINDS = ("proxy", "tunnel", "inference", "abuse")


def run_soak(
    work: Path, report: Report, *, seconds: float, sample_every: float, kinds: tuple[str, ...] = KINDS
) -> None:
    with Origin() as origin, EchoTcpServer() as echo:
        worker = WorkerProcess(
            ["--engine", "echo", "--latency", "0.005", "--max-concurrency", "8"], work / "soak-w.log"
        )
        gw = GatewayProcess(
            [*OPEN_POLICY, "--workers", "2", "-worker-addrs", worker.addr, "--http-ports", "*"], work / "soak-gw.log"
        )
        try:
            wait_until(lambda: requests.get(f"{gw.proxy}/status.json", timeout=5).json()["workers"][0]["healthy"], 10)
            _soak(gw, origin, echo, report, seconds=seconds, sample_every=sample_every, kinds=kinds)
        finally:
            gw.stop()
            worker.stop()


def _soak(
    gw: GatewayProcess,
    origin: Origin,
    echo: EchoTcpServer,
    report: Report,
    *,
    seconds: float,
    sample_every: float,
    kinds: tuple[str, ...],
) -> None:
    stop_at = time.monotonic() + seconds
    ops: Counter[str] = Counter()
    lock = threading.Lock()
    proxies = {"http": gw.proxy}

    def keepalive() -> None:
        with requests.Session() as s:
            while time.monotonic() < stop_at:
                s.get(f"{origin.url}/bytes/2048", proxies=proxies, timeout=10)
                count("proxy keep-alive")

    def new_connections() -> None:
        while time.monotonic() < stop_at:
            requests.get(f"{origin.url}/hello", proxies=proxies, timeout=10, headers={"Connection": "close"})
            count("proxy new connection")

    def tunnels() -> None:
        while time.monotonic() < stop_at:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % echo.port)
                s.recv(4096)
                s.sendall(b"ping" * 256)
                got = 0
                while got < 1024:
                    got += len(s.recv(4096))
            count("tunnel")

    def inference() -> None:
        rng = random.Random(7)
        while time.monotonic() < stop_at:
            body = {"prompt": f"soak {rng.random()} " + "w " * 10, "max_tokens": 12}
            with requests.post(f"{gw.proxy}/v1/inference", json=body, stream=True, timeout=20) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if rng.random() < 0.2 and i > 2:
                        break  # a client leaving mid-stream
            count("inference stream")

    def abuse() -> None:
        rng = random.Random(11)
        while time.monotonic() < stop_at:
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            exchange(
                gw.port, rng.choice([junk, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1\r\n"]), timeout=2
            )
            count("garbage or 404")
            time.sleep(0.01)

    def count(kind: str) -> None:
        with lock:
            ops[kind] += 1

    def guarded(fn):  # type: ignore[no-untyped-def]
        def run() -> None:
            while time.monotonic() < stop_at:
                try:
                    fn()
                except (OSError, requests.RequestException):
                    count("client-side error")

        return run

    loads = {
        "proxy": (keepalive, keepalive, new_connections),
        "tunnel": (tunnels,),
        "inference": (inference, inference),
        "abuse": (abuse,),
    }
    threads = [threading.Thread(target=guarded(fn)) for kind in kinds for fn in loads[kind]]
    for t in threads:
        t.start()
    samples: list[tuple[float, int, int]] = []
    per_process: list[dict[int, int]] = []  # each process's RSS at each sample
    started = time.monotonic()

    def sample() -> None:
        pids = tree_pids(gw.proc.pid)
        samples.append((time.monotonic() - started, rss_kib(pids), fd_count(pids)))
        per_process.append({pid: rss_kib([pid]) for pid in pids})

    while time.monotonic() < stop_at:
        sample()
        time.sleep(min(sample_every, max(0.0, stop_at - time.monotonic())))
    for t in threads:
        t.join()
    sample()
    # After a warm-up (a fifth of the run): the first sample against the last.
    first_warm = next((i for i, s in enumerate(samples) if s[0] >= seconds / 5), 0)
    warm = samples[first_warm:]
    by_process = ", ".join(
        f"{rss / 1024:.1f} → {per_process[-1].get(pid, 0) / 1024:.1f}" for pid, rss in per_process[first_warm].items()
    )
    rss0, rss1 = warm[0][1], warm[-1][1]
    fd0, fd1 = warm[0][2], warm[-1][2]
    growth = (rss1 - rss0) / rss0 * 100
    peak_fd = max(s[2] for s in warm)
    alive = gw.proc.poll() is None
    total = sum(v for k, v in ops.items() if k != "client-side error")
    # The shape matters as much as the ends: still climbing at the end, or levelled off?
    marks = [warm[min(len(warm) - 1, round(i * (len(warm) - 1) / 5))] for i in range(6)]
    trajectory = ", ".join(f"{t:.0f} s: {rss / 1024:.1f}" for t, rss, _ in marks)
    report.add(
        f"soak {seconds:.0f} s, --workers 2, {'+'.join(kinds)}",
        alive and growth < 10 and fd1 <= fd0 + 16,
        f"{total:,} operations ({', '.join(f'{k}: {v:,}' for k, v in sorted(ops.items()))}); "
        f"RSS after warm-up {rss0 / 1024:.1f} MiB → end {rss1 / 1024:.1f} MiB ({growth:+.1f} %); "
        f"open fds {fd0} → {fd1} (peak {peak_fd}); {len(samples)} samples; RSS MiB over time: {trajectory}; "
        f"per process (supervisor first) {by_process} MiB",
    )
