"""Helpers for tests of the inference plane: SSE parsing, requests, waiting on metrics."""

from __future__ import annotations

import re
import time

import requests

from tests.support.gateway import GatewayProcess


def events(resp: requests.Response) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE response."""
    out = []
    event = "message"
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, line[6:]))
            event = "message"
    return out


def infer(gw: GatewayProcess, body: dict, **kw) -> requests.Response:
    return requests.post(f"{gw.proxy}/v1/inference", json=body, timeout=kw.pop("timeout", 30), **kw)


def wait_healthy(gw: GatewayProcess, n: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = requests.get(f"{gw.proxy}/metrics", timeout=5).text
        if (
            text.count("inference_worker_healthy{") >= n
            and sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("inference_worker_healthy{")
            )
            >= n
        ):
            return
        time.sleep(0.05)
    raise AssertionError("workers never became healthy")


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    """The value of one sample on the gateway's /metrics (0 when absent)."""
    text = requests.get(f"{gw.proxy}/metrics", timeout=5).text
    want = {k: v for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in want.items()):
            total += float(m.group(3))
    return total


def wait_for(condition, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `condition()` until true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
