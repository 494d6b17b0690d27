#!/usr/bin/env python3
"""Inference-plane benchmark, in one run, loopback only, bounded in count and time.

(a) time to first token and per-token latency through the gateway vs a direct
    gRPC call to the same echo worker (p50/p99);
(b) tokens/s streamed through one gateway process from zero-latency echo
    workers at 64 concurrent streams;
(c) hf worker (SmolLM2-135M, CPU) tokens/s: one stream vs 8 concurrent streams;
(d) the token path: 16 concurrent 16-token streams from a zero-latency echo
    worker, requests/s direct (grpc.aio; and the gateway's own gRPC client,
    "direct-rpc") vs through one gateway process on both APIs (kept-alive
    connections), and the gateway's CPU per token. "× direct" is against
    grpc.aio.

Run: .venv/bin/python bench/inference_bench.py [--skip-hf] [--only-tokens]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from proxy_bench import cpu_seconds, free_port, gateway_argv, wait_port  # noqa: E402

from proxygate._pb import inference_pb2 as pb  # noqa: E402
from proxygate._pb import inference_pb2_grpc as pbg  # noqa: E402


def start(argv: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    wait_port(port, 120)
    return proc


def worker(port: int, log: Path, *flags: str) -> subprocess.Popen:
    return start(
        [sys.executable, "-m", "proxygate", "worker", "--host", "127.0.0.1", "--port", str(port), *flags], port, log
    )


def gateway(
    port: int, workers: list[int], log: Path, processes: int = 1, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    addrs = ",".join(f"127.0.0.1:{p}" for p in workers)
    flags = ("-worker-addrs", addrs, "-limiter", "none", "--blocklist", "/nonexistent", "--max-queue", "10000")
    flags += ("--workers", str(processes), *extra)
    proc = start(gateway_argv(port, *flags), port, log)
    time.sleep(1.5)  # first health poll
    return proc


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- clients -----------------------------------------------------------------------


async def sse_request(
    port: int,
    body: dict,
    processes: list[str] | None = None,
    headers: bytes = b"",
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
) -> tuple[float, list[float], int]:
    """(ttft, inter-token gaps, tokens) of one /v1/inference stream, timed from the request's send.

    A new connection per request, or `conn` kept alive across requests.
    `processes` collects which gateway process answered (its request-id prefix)."""
    reader, writer = conn if conn is not None else await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    writer.write(
        b"POST /v1/inference HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n%s"
        b"Content-Length: %d\r\n%s\r\n%s"
        % (headers, len(payload), b"" if conn is not None else b"Connection: close\r\n", payload)
    )
    ttft = 0.0
    gaps: list[float] = []
    tokens = 0
    last = start
    while True:
        data = await reader.read(65536)
        if not data:
            break
        if processes is not None and (at := data.find(b"X-Request-ID: ")) != -1:
            processes.append(data[at + 14 : at + 24].decode())
        n = data.count(b'"token":')
        if n:
            now = time.perf_counter()
            if not tokens:
                ttft = now - start
            else:
                gaps.append((now - last) / n)
            tokens += n
            last = now
        if b'"finished":true' in data:
            break
    if conn is None:
        writer.close()
    else:
        while not data.endswith(b"0\r\n\r\n"):  # the chunked body's end, before the next request
            data = await reader.read(65536) or b"0\r\n\r\n"
    return ttft, gaps, tokens


async def grpc_request(stub: pbg.ModelServiceStub, body: dict) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    ttft = 0.0
    gaps: list[float] = []
    tokens = 0
    last = start
    async for msg in stub.Generate(
        pb.GenerateRequest(
            request_id="b", model="default-model", prompt=body["prompt"], max_tokens=body["max_tokens"], temperature=0.0
        )
    ):
        if msg.token:
            now = time.perf_counter()
            if not tokens:
                ttft = now - start
            else:
                gaps.append(now - last)
            tokens += 1
            last = now
    return ttft, gaps, tokens


async def latency_compare(
    gw_port: int, worker_port: int, n: int, keep_alive: bool = False
) -> dict[str, dict[str, float]]:
    """Direct gRPC vs through the gateway, interleaved; with several gateway processes,
    also per process (the first one owns the inference plane, the others relay to it)."""
    conn = await asyncio.open_connection("127.0.0.1", gw_port) if keep_alive else None
    body = {"prompt": " ".join(f"w{i}" for i in range(20)), "max_tokens": 21, "temperature": 0}
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}")
    stub = pbg.ModelServiceStub(channel)
    samples: dict[str, tuple[list[float], list[float]]] = {"direct gRPC": ([], []), "via gateway": ([], [])}
    by_process: dict[str, list[float]] = {}
    for _ in range(n):  # interleaved so drift hits both alike
        for name in ("direct gRPC", "via gateway"):
            if name == "direct gRPC":
                ttft, gaps, _ = await grpc_request(stub, body)
            else:
                seen: list[str] = []
                ttft, gaps, _ = await sse_request(gw_port, body, seen, conn=conn)
                by_process.setdefault(seen[0] if seen else "?", []).append(ttft)
            samples[name][0].append(ttft)
            samples[name][1].extend(gaps)
    await channel.close()
    if conn is not None:
        conn[1].close()
    out: dict[str, dict[str, float]] = {}
    for name, (ttfts, gaps) in samples.items():
        out[name] = {
            "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
            "ttft_p99_ms": pct(ttfts, 0.99) * 1e3,
            "token_p50_ms": pct(gaps, 0.5) * 1e3,
            "token_p99_ms": pct(gaps, 0.99) * 1e3,
        }
    if len(by_process) > 1:
        for i, ttfts in enumerate(sorted(by_process.values(), key=statistics.median)):
            out[f"via gateway, process {i + 1} ({len(ttfts)} requests)"] = {
                "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
                "ttft_p99_ms": pct(ttfts, 0.99) * 1e3,
                "token_p50_ms": float("nan"),
                "token_p99_ms": float("nan"),
            }
    return out


async def throughput(gw_port: int, streams: int, seconds: float, tokens_per_stream: int, headers: bytes = b"") -> float:
    body = {"prompt": " ".join(["tok"] * (tokens_per_stream - 1)), "max_tokens": tokens_per_stream}
    deadline = time.monotonic() + seconds
    total = 0

    async def loop() -> None:
        nonlocal total
        while time.monotonic() < deadline:
            _, _, n = await sse_request(gw_port, body, headers=headers)
            total += n

    start = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(streams)))
    return total / (time.monotonic() - start)


async def hf_rate(worker_port: int, streams: int, max_tokens: int) -> float:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}")
    stub = pbg.ModelServiceStub(channel)
    prompts = [
        "Write a long story about a lighthouse keeper.",
        "Explain how rain forms, in detail.",
        "Describe a walk through a busy market.",
        "Write a letter to a friend about a trip.",
        "List many animals and describe each.",
        "Tell the history of bread.",
        "Describe the planets of the solar system.",
        "Write a poem about autumn leaves.",
    ]

    async def one(i: int) -> int:
        n = 0
        async for msg in stub.Generate(
            pb.GenerateRequest(
                request_id=str(i),
                model="m",
                prompt=prompts[i % 8],
                max_tokens=max_tokens,
                temperature=0.8,
                seed=i,
                has_seed=True,
            )
        ):
            n += 1 if msg.token else 0
        return n

    start = time.monotonic()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.monotonic() - start
    await channel.close()
    return sum(counts) / elapsed


async def stream_rate(port: int, api: str, streams: int, tokens: int, seconds: float) -> tuple[float, int]:
    """(requests/s, tokens) of `streams` clients each streaming `tokens`-token requests back to back,
    on one kept-alive connection each; `api` is "direct" (grpc.aio to the worker), "direct-rpc" (the
    gateway's own gRPC client, rpc.channel, to the worker), "seed" or "openai"."""
    prompt = " ".join(["tok"] * (tokens - 1))
    deadline = time.monotonic() + seconds
    done = 0
    seen = 0
    if api in ("direct", "direct-rpc"):
        request = pb.GenerateRequest(request_id="b", model="m", prompt=prompt, max_tokens=tokens, temperature=0.0)
        if api == "direct":
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            call = functools.partial(pbg.ModelServiceStub(channel).Generate, request)
            close = channel.close
        else:  # the gateway's own gRPC client, called directly
            from proxygate.rpc.channel import Channel

            own = Channel(f"127.0.0.1:{port}")
            generate, decode = "/inference.ModelService/Generate", pb.TokenResponse.FromString
            call = functools.partial(own.unary_stream, generate, request.SerializeToString(), decode, 30)
            close = own.close

        async def one_direct() -> None:
            nonlocal done, seen
            while time.monotonic() < deadline:
                async for msg in call():
                    seen += 1 if msg.token else 0
                done += 1

        start = time.monotonic()
        await asyncio.gather(*(one_direct() for _ in range(streams)))
        elapsed = time.monotonic() - start
        await close()
        return done / elapsed, seen
    if api == "seed":
        path, body, marker = b"/v1/inference", {"prompt": prompt, "max_tokens": tokens}, b'"token":'
    else:
        path = b"/v1/chat/completions"
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "stream": True}
        marker = b'"content":'
    payload = json.dumps(body).encode()
    head = b"POST %s HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
        path,
        len(payload),
    )

    async def one_sse() -> None:
        nonlocal done, seen
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline:
            writer.write(head + payload)
            data = b""
            while not data.endswith(b"0\r\n\r\n"):  # the chunked body's end
                more = await reader.read(65536)
                if not more:
                    raise RuntimeError("the gateway closed the connection")
                data = data[-8:] + more
                seen += more.count(marker)
            done += 1
        writer.close()

    start = time.monotonic()
    await asyncio.gather(*(one_sse() for _ in range(streams)))
    return done / (time.monotonic() - start), seen


def token_path(args: argparse.Namespace, logs: Path, lines: list[str], procs: list[subprocess.Popen]) -> None:
    """(d): direct, seed API and OpenAI API interleaved, `args.runs` rounds."""
    w_port, g_port = free_port(), free_port()
    procs.append(worker(w_port, logs / "bench-worker-d.log", "--max-concurrency", "64"))
    gw = gateway(g_port, [w_port], logs / "bench-gw-d.log")
    procs.append(gw)
    runs: dict[str, list[tuple[float, float]]] = {"direct": [], "seed": [], "openai": []}
    if importlib.util.find_spec("proxygate.rpc") is not None:  # absent in checkouts before it
        runs["direct-rpc"] = []
    for _ in range(args.runs):
        for api in runs:
            direct = api.startswith("direct")
            cpu0 = cpu_seconds(gw.pid)
            rate, tokens = asyncio.run(stream_rate(w_port if direct else g_port, api, 16, 16, args.seconds))
            cpu = cpu_seconds(gw.pid) - cpu0
            runs[api].append((rate, cpu / tokens * 1e6 if not direct and tokens else float("nan")))
    direct = statistics.median(r for r, _ in runs["direct"])
    lines += [
        "### (d) the token path: 16 concurrent 16-token streams, zero-latency echo worker, kept-alive connections",
        "",
        "| path | requests/s (median) | runs | × direct | gateway CPU µs per token (median) |",
        "|---|---|---|---|---|",
    ]
    for api, rs in runs.items():
        rate = statistics.median(r for r, _ in rs)
        cpu = statistics.median(c for _, c in rs)
        cpu_cell = "–" if api.startswith("direct") else f"{cpu:.0f}"
        lines.append(
            f"| {api} | {rate:.0f} | {', '.join(f'{r:.0f}' for r, _ in rs)} | {rate / direct:.2f}× | {cpu_cell} |"
        )
    lines.append("")
    for p in procs:
        p.terminate()
        p.wait(10)
    procs.clear()


def echo_sections(args: argparse.Namespace, logs: Path, lines: list[str], procs: list[subprocess.Popen]) -> None:
    # (a) one echo worker with a small per-token latency, gateway in front.
    w_port, g_port = free_port(), free_port()
    procs.append(worker(w_port, logs / "bench-worker-a.log", "--latency", "0.002", "--max-concurrency", "8"))
    procs.append(
        gateway(g_port, [w_port], logs / "bench-gw-a.log", args.gateway_workers, tuple(args.gateway_args.split()))
    )
    lat = asyncio.run(latency_compare(g_port, w_port, args.samples, args.keep_alive))
    connections = "one kept-alive connection" if args.keep_alive else "a new connection per request"
    lines += [
        f"### (a) latency, echo worker at 2 ms/token, one request at a time on {connections}, "
        f"gateway --workers {args.gateway_workers}",
        "",
        "| path | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | per-token p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in lat.items():
        lines.append(
            f"| {name} | {row['ttft_p50_ms']:.2f} | {row['ttft_p99_ms']:.2f} | "
            f"{row['token_p50_ms']:.2f} | {row['token_p99_ms']:.2f} |"
        )
    added = lat["via gateway"]["ttft_p50_ms"] - lat["direct gRPC"]["ttft_p50_ms"]
    lines += ["", f"Gateway adds {added:.2f} ms to TTFT p50 (bar: ≤ 1 ms).", ""]
    for p in procs:
        p.terminate()
        p.wait(10)
    procs.clear()
    if args.only_latency:
        return

    # (b) two zero-latency echo workers, 64 concurrent streams.
    w1, w2, g_port = free_port(), free_port(), free_port()
    procs.append(worker(w1, logs / "bench-worker-b1.log", "--max-concurrency", "64"))
    procs.append(worker(w2, logs / "bench-worker-b2.log", "--max-concurrency", "64"))
    procs.append(gateway(g_port, [w1, w2], logs / "bench-gw-b.log"))
    rates = [asyncio.run(throughput(g_port, 64, args.seconds, 100)) for _ in range(args.runs)]
    lines += [
        "### (b) tokens/s through one gateway, 64 concurrent streams, zero-latency echo workers",
        "",
        f"median {statistics.median(rates):.0f} tokens/s over {args.runs} runs of {args.seconds:g} s "
        f"(runs: {', '.join(f'{r:.0f}' for r in rates)}); bar ≥ 20,000.",
        "",
    ]
    for p in procs:
        p.terminate()
        p.wait(10)
    procs.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="requests per side for (a)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of (b)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="gateway processes for (a): 2 puts the inference relay in the path",
    )
    parser.add_argument("--keep-alive", action="store_true", help="(a) on one kept-alive connection")
    parser.add_argument("--gateway-args", default="", help="more gateway flags for (a), e.g. '--coalesce off'")
    parser.add_argument("--only-latency", action="store_true", help="only (a)")
    parser.add_argument("--only-hf", action="store_true", help="only (c)")
    parser.add_argument("--only-tokens", action="store_true", help="only (d)")
    args = parser.parse_args()
    logs = ROOT / "bench" / "out"
    logs.mkdir(exist_ok=True)
    lines: list[str] = []
    procs: list[subprocess.Popen] = []
    try:
        if args.only_tokens:
            token_path(args, logs, lines, procs)
        elif not args.only_hf:
            echo_sections(args, logs, lines, procs)
            if not args.only_latency:
                token_path(args, logs, lines, procs)
        if not args.skip_hf and not args.only_tokens and not args.only_latency:
            # (c) the real model, one stream vs 8 concurrent streams.
            w_port = free_port()
            procs.append(
                worker(
                    w_port, logs / "bench-worker-hf.log", "--engine", "hf", "--max-concurrency", "8", "--threads", "2"
                )
            )
            channel = grpc.insecure_channel(f"127.0.0.1:{w_port}")
            stub = pbg.ModelServiceStub(channel)
            deadline = time.monotonic() + 180
            while not stub.Health(pb.HealthRequest()).ready and time.monotonic() < deadline:
                time.sleep(0.5)
            channel.close()
            asyncio.run(hf_rate(w_port, 1, 8))  # warm-up
            one = [asyncio.run(hf_rate(w_port, 1, 64)) for _ in range(args.runs)]
            eight = [asyncio.run(hf_rate(w_port, 8, 64)) for _ in range(args.runs)]
            ratio = statistics.median(eight) / statistics.median(one)
            lines += [
                "### (c) hf worker (SmolLM2-135M-Instruct, default weights, CPU, 2 threads), 64 tokens per stream",
                "",
                "| streams | tokens/s (median) | runs |",
                "|---|---|---|",
                f"| 1 | {statistics.median(one):.1f} | {', '.join(f'{r:.1f}' for r in one)} |",
                f"| 8 | {statistics.median(eight):.1f} | {', '.join(f'{r:.1f}' for r in eight)} |",
                "",
                f"8 streams / 1 stream = {ratio:.2f}× (bar ≥ 2.5×).",
                "",
            ]
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    out = "\n".join(lines)
    print(out)
    (logs / "inference-latest.md").write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
