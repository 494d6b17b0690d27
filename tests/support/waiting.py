"""Waiting on a condition, and reading the gateway's /metrics: how tests order events without sleeps."""

from __future__ import annotations

import re
import time

import requests

from tests.support.gateway import GatewayProcess


def wait_for(condition, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `condition()` until true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


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
