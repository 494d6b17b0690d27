"""Worker faults under load: a worker stopped (SIGSTOP, a hung GPU), one killed and restarted.

Client threads stream /v1/inference requests through a gateway with two
echo workers for the whole run. Meanwhile worker A is stopped for a few
seconds and resumed, and worker B is killed and started again on its port.
Every stream must end by itself: completed, retried on the other worker (no
token sent yet), or ended with an error event within the token timeout of
its last token; none may hang, none may get a 500. B must be re-admitted
and serve again after its restart.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from .harness import GatewayProcess, Report, WorkerProcess, wait_until

TOKEN_TIMEOUT = 1.0


def run_worker_faults(work: Path, report: Report, *, seconds: float = 10.0, clients: int = 4) -> None:
    flags = ["--engine", "echo", "--latency", "0.02", "--max-concurrency", "8"]
    a = WorkerProcess(flags, work / "faults-worker-a.log")
    b = WorkerProcess(flags, work / "faults-worker-b.log")
    gw = GatewayProcess(
        [
            "-worker-addrs",
            f"{a.addr},{b.addr}",
            "--token-timeout",
            f"{TOKEN_TIMEOUT:g}s",
            "--health-interval",
            "0.2",
            "--routing-policy",
            "round-robin",
        ],
        work / "faults-gateway.log",
    )
    outcomes: Counter[str] = Counter()
    worst_stall = 0.0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        nonlocal worst_stall
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            body = {"prompt": f"c{index} r{n} " + "w " * 20, "max_tokens": 25}
            last = time.monotonic()
            outcome, stall = "hung", 0.0
            try:
                with requests.post(f"{gw.proxy}/v1/inference", json=body, stream=True, timeout=20) as r:
                    if r.status_code != 200:
                        outcome = f"http {r.status_code}"
                    else:
                        outcome = "no end"
                        for line in r.iter_lines():
                            if line.startswith(b"event: error"):
                                outcome, stall = "error event", time.monotonic() - last
                            elif line.startswith(b"data:") and outcome != "error event":
                                last = time.monotonic()
                                if json.loads(line[5:]).get("finished"):
                                    outcome = "completed"
            except requests.RequestException as exc:
                outcome = f"client error {type(exc).__name__}"
            with lock:
                outcomes[outcome] += 1
                worst_stall = max(worst_stall, stall)

    try:
        wait_until(lambda: requests.get(f"{gw.proxy}/status.json", timeout=5).json()["workers"][1]["healthy"], 10)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(seconds * 0.1)
        a.proc.send_signal(signal.SIGSTOP)  # hung: streams on it stall
        time.sleep(max(2.0, seconds * 0.25))
        a.proc.send_signal(signal.SIGCONT)
        time.sleep(seconds * 0.1)
        b.kill()  # gone: streams on it break
        time.sleep(1.0)
        b.start()  # back on the same port
        readmitted = wait_until(
            lambda: requests.get(f"{gw.proxy}/status.json", timeout=5).json()["workers"][1]["state"] == "ready", 10
        )
        for t in threads:
            t.join()
        # Once re-admitted it takes its turn again (round-robin: one of every two requests).
        for i in range(4):
            requests.post(f"{gw.proxy}/v1/inference", json={"prompt": f"after {i}", "max_tokens": 2}, timeout=20)
        served_after = b.health().generations_started
        retried = gw.log().count("before the first token")  # moved to the other worker, invisibly to the client
    finally:
        a.proc.send_signal(signal.SIGCONT)
        gw.stop()
        a.stop()
        b.stop()
    total = sum(outcomes.values())
    bad = {k: v for k, v in outcomes.items() if k not in ("completed", "error event")}
    ok = not bad and worst_stall <= TOKEN_TIMEOUT + 1.5 and readmitted and served_after > 0
    report.add(
        "worker faults under load (stop, kill, restart)",
        ok,
        f"{total} streams: {dict(outcomes)}, {retried} of the completed ones retried on the other worker "
        f"before their first token; worst wait from last token to error event {worst_stall:.2f} s "
        f"(token timeout {TOKEN_TIMEOUT:g} s); restarted worker re-admitted: {readmitted}, "
        f"generations on it after restart: {served_after}",
    )
