#!/usr/bin/env python3
"""Rate-limiter cost: gateway req/s with the memory limiter, the Redis limiter and none, in one run,
plus the cost of one limiter check in microseconds.

Loopback only; bounded by --duration and --runs. nginx is the origin, wrk the
client (absolute-form requests through the gateway, c=64), redis-server is
started on a free port. Limits are set so high that nothing is rejected: the
check is paid on every request, the 429 path is not what is measured.

Run: .venv/bin/python bench/ratelimit_bench.py [--runs 3] [--duration 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import free_port, gateway_argv, start_nginx, wait_port, wrk  # noqa: E402

from proxygate.policy.ratelimit import BucketSpec, MemoryLimiter, RedisLimiter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.redis_server import RedisServer  # noqa: E402

HUGE = "1000000000"


def gateway(port: int, work: Path, *flags: str) -> subprocess.Popen:
    argv = gateway_argv(
        port,
        "--deny-destinations",
        "",
        "--blocklist",
        str(work / "none.json"),
        "-rate-limit",
        HUGE,
        "-rate-burst",
        HUGE,
    )
    proc = subprocess.Popen([*argv, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    time.sleep(0.3)
    return proc


async def check_cost(lim, n: int, concurrency: int) -> float:
    """Microseconds of wall time per check, `concurrency` checks in flight."""
    keys = [f"10.0.{i // 250}.{i % 250}" for i in range(1000)]

    async def worker(offset: int) -> None:
        for i in range(n // concurrency):
            await lim.check(keys[(offset + i) % len(keys)])

    start = time.perf_counter()
    await asyncio.gather(*(worker(o) for o in range(concurrency)))
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlbench-") as tmp:
        work = Path(tmp)
        nginx, origin = start_nginx(work)
        redis = RedisServer(work)  # the same real redis-server the tests start
        redis.start()
        redis_port = redis.port
        url = f"http://127.0.0.1:{origin}/small"
        try:
            configs = {
                "none (limits off)": ("-limiter", "none"),
                "memory": ("-limiter", "memory"),
                "redis": ("-limiter", "redis", "-redis-addr", f"127.0.0.1:{redis_port}"),
            }
            results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
            for _ in range(args.runs):  # interleaved, so drift hits every config alike
                for name, flags in configs.items():
                    port = free_port()
                    proc = gateway(port, work, *flags)
                    try:
                        results[name].append(wrk(url, port, 64, args.duration, work))
                    finally:
                        proc.terminate()
                        proc.wait(10)
            base = statistics.median(r["rps"] for r in results["none (limits off)"])
            for name, runs in results.items():
                rps = statistics.median(r["rps"] for r in runs)
                p99 = statistics.median(r["p99_ms"] for r in runs)
                rows.append(f"| {name} | {rps:.0f} | {p99:.2f} | {rps / base:.2f} |")

            async def costs() -> list[str]:
                spec = BucketSpec.per_minute(1e9, 10**9)
                mem = MemoryLimiter(spec)
                red = RedisLimiter(spec, f"127.0.0.1:{redis_port}")
                out = [
                    f"| memory check | {statistics.median([await check_cost(mem, 200_000, 1) for _ in range(3)]):.2f} µs |",
                    f"| redis check, 1 in flight | {statistics.median([await check_cost(red, 5000, 1) for _ in range(3)]):.1f} µs |",
                    f"| redis check, 64 in flight | {statistics.median([await check_cost(red, 20000, 64) for _ in range(3)]):.1f} µs |",
                ]
                await red.aclose()
                return out

            cost_rows = asyncio.run(costs())
        finally:
            redis.stop()
            nginx.terminate()
            nginx.wait(10)
    out = "\n".join(
        [
            "| limiter | req/s (c=64) | p99 ms | vs limits off |",
            "|---|---|---|---|",
            *rows,
            "",
            "| limiter check | cost |",
            "|---|---|",
            *cost_rows,
        ]
    )
    print(out)
    (Path(__file__).resolve().parent / "out").mkdir(exist_ok=True)
    (Path(__file__).resolve().parent / "out" / "ratelimit-latest.md").write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
