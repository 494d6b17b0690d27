#!/usr/bin/env python3
"""What API keys and budgets cost: the same loads with and without them, in one run.

- inference path: time to first token (one request at a time, p50) and
  tokens/s through the gateway (64 streams, zero-latency echo workers);
- proxy path: small-request req/s at c=64 through the forward proxy (wrk,
  nginx origin), without authentication vs `--proxy-auth keys`.

Configurations: each store (memory; Redis) with and without keys (keys:
`--api-keys` with budgets and `--proxy-auth keys`; the per-address limiter
and the budgets in that store); ratios compare within a store. Budgets are set far above
the load so nothing is refused: what is measured is the checking. Rounds
interleave the configurations; medians are reported with ratios to "no keys".

Run: .venv/bin/python bench/tenant_bench.py [--runs 3] [--seconds 5]
Needs wrk, nginx and redis-server (apt-get install -y wrk nginx-light redis-server).
Loopback only; every load is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from inference_bench import pct, sse_request, start, throughput, worker  # noqa: E402
from proxy_bench import free_port, gateway_argv, start_nginx, wait_port, wrk  # noqa: E402

from proxygate.policy.keys import digest  # noqa: E402

TOKEN = "pg-bench-token"
CONFIGS = ("memory, no keys", "memory, keys", "redis, no keys", "redis, keys")


def key_file(folder: Path) -> Path:
    path = folder / "keys.toml"
    path.write_text(
        f'[keys.bench]\nsha256 = "{digest(TOKEN)}"\nrequests_per_minute = 100000000\ntokens_per_minute = 1000000000\n'
    )
    return path


def gateway_flags(config: str, keys: Path, redis_addr: str, workers: list[int]) -> list[str]:
    flags = ["--blocklist", "/nonexistent", "--max-queue", "10000", "--connect-ports", "*", "--deny-destinations", ""]
    flags += ["-rate-limit", "100000000", "-rate-burst", "100000000"]
    if workers:
        flags += ["-worker-addrs", ",".join(f"127.0.0.1:{p}" for p in workers)]
    if config.endswith(", keys"):
        flags += ["--api-keys", str(keys), "--proxy-auth", "keys"]
    if config.startswith("redis"):
        flags += ["-limiter", "redis", "-redis-addr", redis_addr]
    return flags


async def ttft_p50(port: int, n: int, headers: bytes) -> float:
    body = {"prompt": "one two three four", "max_tokens": 5, "temperature": 0.5}
    samples = [(await sse_request(port, body, headers=headers))[0] for _ in range(n)]
    return pct(samples, 0.5) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=200, help="sequential requests for TTFT")
    args = parser.parse_args()
    logs = ROOT / "bench" / "out"
    logs.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tenant-bench-"))
    procs: list[subprocess.Popen] = []
    results: dict[str, dict[str, list[float]]] = {c: {"ttft": [], "tps": [], "rps": []} for c in CONFIGS}
    try:
        nginx, origin_port = start_nginx(work)
        procs.append(nginx)
        redis_port = free_port()
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
        wait_port(redis_port)
        w1, w2 = free_port(), free_port()
        procs.append(worker(w1, logs / "bench-tenant-w1.log", "--max-concurrency", "64"))
        procs.append(worker(w2, logs / "bench-tenant-w2.log", "--max-concurrency", "64"))
        keys = key_file(work)
        bearer = b"Authorization: Bearer %s\r\n" % TOKEN.encode()
        basic = "Proxy-Authorization: Basic " + base64.b64encode(f"bench:{TOKEN}".encode()).decode()
        for _ in range(args.runs):
            for config in CONFIGS:
                port = free_port()
                flags = gateway_flags(config, keys, f"127.0.0.1:{redis_port}", [w1, w2])
                gw = start(gateway_argv(port, *flags), port, logs / "bench-tenant-gw.log")
                try:
                    time.sleep(1.5)  # first health poll
                    keyed = config.endswith(", keys")
                    headers = bearer if keyed else b""
                    results[config]["ttft"].append(asyncio.run(ttft_p50(port, args.samples, headers)))
                    results[config]["tps"].append(asyncio.run(throughput(port, 64, args.seconds, 100, headers)))
                    proxy_headers = (basic,) if keyed else ()
                    out = wrk(
                        f"http://127.0.0.1:{origin_port}/small", port, 64, args.seconds, work, headers=proxy_headers
                    )
                    if out["errors"]:
                        raise RuntimeError(f"{config}: {out['errors']} non-2xx answers through the proxy")
                    results[config]["rps"].append(out["rps"])
                finally:
                    gw.terminate()
                    gw.wait(10)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    lines = [
        f"### Cost of API keys and budgets ({args.runs} interleaved rounds, medians; {args.seconds:g} s loads)",
        "",
        "| store, keys | TTFT p50 ms | tokens/s, 64 streams | proxy req/s, c=64 | tokens/s vs no keys | req/s vs no keys |",
        "|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        store = config.split(",")[0]
        base = {k: statistics.median(v) for k, v in results[f"{store}, no keys"].items()}
        m = {k: statistics.median(v) for k, v in results[config].items()}
        lines.append(
            f"| {config} | {m['ttft']:.2f} | {m['tps']:.0f} | {m['rps']:.0f} | "
            f"{m['tps'] / base['tps']:.2f} | {m['rps'] / base['rps']:.2f} |"
        )
    lines += ["", "Bars: throughput cost ≤ 10 % with the memory store, ≤ 20 % with Redis.", ""]
    out = "\n".join(lines)
    print(out)
    (logs / "tenant-latest.md").write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
