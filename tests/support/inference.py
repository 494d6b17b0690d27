"""Helpers for tests of the inference plane: SSE parsing, requests, waiting for healthy workers."""

from __future__ import annotations

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
