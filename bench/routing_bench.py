#!/usr/bin/env python3
"""Routing-policy benchmark: prefix-affine vs least-loaded vs round-robin, same workload, same run.

Workload (as the routing issue sets it): 16 groups of requests, each group
sharing a 2,000-character prefix followed by a unique question, in random
order (fixed seed), 8 at a time, streamed through /v1/completions. Echo
workers simulate a prefix cache of 5 prompt families each and charge a
prefill delay per uncached prompt word, so a cache miss costs time.

- uniform: every group equally likely;
- hot: 80 % of requests share one hot prefix (does prefix affinity pile
  them onto one worker?).

For each policy: prefix hit rate (requests whose shared prefix came from the
worker's cache), the largest worker's share of requests over the mean, total
time, and time to first token p50/p99. Optionally (`--hf`) the uniform
workload, smaller, on 2 real hf workers with their KV prefix cache.

Run: .venv/bin/python bench/routing_bench.py [--requests 192] [--hf]
Loopback only; every loop is bounded by a request count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from inference_bench import pct, start, worker  # noqa: E402
from proxy_bench import free_port, gateway_argv  # noqa: E402

from proxygate._pb import inference_pb2 as pb  # noqa: E402
from proxygate._pb import inference_pb2_grpc as pbg  # noqa: E402

POLICIES = ("prefix", "least-loaded", "round-robin")
GROUPS = 16


_PROSE = (
    "the of and to in is was for on that with as by at from this be are or it an which were have has had not "
    "but their they one all also its first more been other new two into can time after most used only when "
    "such some may over these system people year years between under part city many would later during "
    "known then each three where while number state same both world several high since name area him work "
    "well use form found following often being called four large water group small like long different "
    "made early five before general however united through national among against because based second"
)
WORDS = _PROSE.split()


def prefixes(n: int, chars: int = 2000) -> list[str]:
    """`n` distinct prose-like prefixes of about `chars` characters (about 400 tokens each)."""
    out = []
    for g in range(n):
        rng = random.Random(1000 + g)
        words = [f"Group {g} notes:"]
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words))
    return out


async def completion(port: int, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """(ttft, cached_tokens, prompt_tokens) of one streamed completion on a new connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(
        {"model": "default-model", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    ).encode()
    started = time.perf_counter()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    ttft = 0.0
    data = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        if not ttft and b'"text":"' in chunk:
            ttft = time.perf_counter() - started
        data += chunk
        if b"[DONE]" in data:
            break
    writer.close()
    head, _, _ = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    usage = None
    for line in data.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = json.loads(line[6:])["usage"]
    assert usage is not None, data[-500:]
    return ttft, usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]


async def run_workload(port: int, plan: list[tuple[int, str]], concurrency: int, max_tokens: int) -> list[tuple]:
    queue = list(enumerate(plan))
    out: list[tuple] = [None] * len(plan)  # type: ignore[list-item]

    async def client() -> None:
        while queue:
            i, (group, prompt) = queue.pop(0)
            out[i] = (group, *await completion(port, prompt, max_tokens))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return out


def make_plan(n: int, hot: bool, seed: int) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    texts = prefixes(GROUPS)
    plan = []
    for i in range(n):
        group = 0 if hot and rng.random() < 0.8 else rng.randrange(1 if hot else 0, GROUPS)
        plan.append((group, f"{texts[group]} question {i} {rng.random():.6f}"))
    return plan


def health(port: int) -> pb.HealthResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pbg.ModelServiceStub(ch).Health(pb.HealthRequest(), timeout=5)


def wait_ready(ports: list[int], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(health(p).ready for p in ports):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError("workers not ready")


def one_policy(
    policy: str,
    plan: list[tuple[int, str]],
    worker_flags: list[str],
    n_workers: int,
    args: argparse.Namespace,
    tag: str,
) -> dict[str, float]:
    logs = ROOT / "bench" / "out"
    procs: list[subprocess.Popen] = []
    try:
        ports = [free_port() for _ in range(n_workers)]
        for i, p in enumerate(ports):
            procs.append(worker(p, logs / f"bench-routing-{tag}-w{i}.log", *worker_flags))
        wait_ready(ports)
        g_port = free_port()
        flags = [
            "-worker-addrs",
            ",".join(f"127.0.0.1:{p}" for p in ports),
            "-limiter",
            "none",
            "--blocklist",
            "/nonexistent",
            "--routing-policy",
            policy,
            "--coalesce",
            "off",
        ]
        procs.append(start(gateway_argv(g_port, *flags), g_port, logs / f"bench-routing-{tag}-gw.log"))
        time.sleep(1.5)  # first health poll
        started = time.perf_counter()
        results = asyncio.run(run_workload(g_port, plan, args.concurrency, args.max_tokens))
        total = time.perf_counter() - started
        served = [health(p).prefix_cache_queries for p in ports]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    # A hit: the shared prefix (all but the unique question) came from cache.
    hits = sum(1 for _g, _t, cached, prompt_tokens in results if cached >= prompt_tokens * args.hit_share)
    ttfts = [t for _g, t, _c, _p in results]
    return {
        "hit_rate": hits / len(results),
        "max_share": max(served) / statistics.mean(served),
        "total_s": total,
        "ttft_p50_ms": pct(ttfts, 0.5) * 1000,
        "ttft_p99_ms": pct(ttfts, 0.99) * 1000,
    }


def compare(runs: int, measure: Callable[[str, int], dict[str, float]]) -> dict[str, dict[str, float]]:
    """Every policy's figures, medians over `runs` rounds; each round runs every policy in turn."""
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in POLICIES}
    for run in range(runs):
        for policy in POLICIES:
            samples[policy].append(measure(policy, run))
    return {p: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for p, xs in samples.items()}


def table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| policy | prefix hit rate | max worker share / mean | total s | TTFT p50 ms | TTFT p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for policy, r in rows.items():
        lines.append(
            f"| {policy} | {r['hit_rate'] * 100:.1f} % | {r['max_share']:.2f} | {r['total_s']:.2f} | "
            f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--prefill-ms", type=float, default=0.2, help="echo: simulated prefill ms per uncached word")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--worker-capacity", type=int, default=4, help="echo workers' --max-concurrency")
    parser.add_argument("--runs", type=int, default=3, help="runs per policy and workload (medians reported)")
    parser.add_argument("--hf", action="store_true", help="also the uniform workload on 2 hf workers")
    parser.add_argument("--hf-requests", type=int, default=128)
    parser.add_argument("--hf-cache-mb", type=int, default=128, help="hf workers' --prefix-cache-mb (about 7 prefixes)")
    args = parser.parse_args()
    echo_flags = [
        "--engine",
        "echo",
        "--prefix-cache-slots",
        "5",
        "--prefill-ms-per-token",
        str(args.prefill_ms),
        "--latency",
        "0.002",
        "--max-concurrency",
        str(args.worker_capacity),
    ]
    lines: list[str] = []
    checks: list[str] = []
    for name, hot in (("uniform", False), ("hot", True)):
        plan = make_plan(args.requests, hot, args.seed)
        args.hit_share = 0.9  # the question is a few words of ~260
        rows = compare(
            args.runs,
            lambda p, run, plan=plan, name=name: one_policy(p, plan, echo_flags, 4, args, f"{name}-{p}-{run}"),
        )
        lines += [
            f"### {name}: 4 echo workers (5 prefix slots, capacity {args.worker_capacity} each), {GROUPS} groups, "
            f"{args.requests} requests, concurrency {args.concurrency}; medians of {args.runs} runs",
            "",
            *table(rows),
            "",
        ]
        best_other = max(rows["least-loaded"]["hit_rate"], rows["round-robin"]["hit_rate"])
        if name == "uniform":
            pr = rows["prefix"]
            checks.append(f"uniform: prefix hit rate {pr['hit_rate'] * 100:.1f} % (bar ≥ 80 %)")
            checks.append(
                f"uniform: prefix hit rate / best other {pr['hit_rate'] / max(best_other, 1e-9):.2f}× (bar ≥ 2×)"
            )
            checks.append(f"uniform: largest worker share {pr['max_share']:.2f}× the mean (bar ≤ 1.6×)")
        else:
            ratio = rows["prefix"]["total_s"] / rows["least-loaded"]["total_s"]
            checks.append(f"hot: prefix total time / least-loaded's = {ratio:.2f} (bar ≤ 1.1)")
    if args.hf:
        plan = make_plan(args.hf_requests, False, args.seed)
        args.hit_share = 0.8  # chat-free raw prompts: the question is ~10 of ~600 tokens
        hf_flags = ["--engine", "hf", "--threads", "1", "--max-concurrency", "4"]
        hf_flags += ["--prefix-cache-mb", str(args.hf_cache_mb)]
        rows = compare(1, lambda p, run: one_policy(p, plan, hf_flags, 2, args, f"hf-{p}"))
        lines += [
            f"### uniform on 2 hf workers (SmolLM2-135M, CPU, 1 thread each, {args.hf_cache_mb} MB prefix cache), "
            f"{GROUPS} groups, {args.hf_requests} requests, concurrency {args.concurrency}",
            "",
            *table(rows),
            "",
        ]
    lines += ["Bars:", "", *(f"- {c}" for c in checks), ""]
    out = "\n".join(lines)
    print(out)
    (ROOT / "bench" / "out" / "routing-latest.md").write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
