#!/usr/bin/env python3
"""Forward-proxy benchmark: proxygate against a direct connection and peer proxies, in one run.

Everything runs on loopback and stops by itself. nginx is the origin; wrk
drives plain-HTTP load (absolute-form requests through each proxy); a small
uvloop client measures CONNECT setups/s and bulk MB/s through one tunnel.

Peers: tinyproxy, squid (Debian), pproxy, proxy.py (PyPI, in bench/.venv).
Set-up once:  apt-get install -y nginx-light wrk tinyproxy squid
              python3 -m venv bench/.venv && bench/.venv/bin/pip install pproxy proxy.py "uvloop<0.20"  (pproxy breaks on newer uvloop)
Run:          .venv/bin/python bench/proxy_bench.py [--runs 3] [--duration 3] [--only proxygate,squid] [--interleaved N]

proxygate, squid and proxy.py write one access-log line per request (their
default). tinyproxy logs only critical errors: at its default Info level it
stalls here (about 700 req/s, p99 300 ms); pproxy logs nothing unless asked.
proxygate runs as the default (`--workers auto`: one process per CPU, two
here), as `proxygate-1p` (`--workers 1`) and as `proxygate-2p` (`--workers 2`);
`--only` picks among them.

`--workers-sweep N` compares one proxygate process with `--workers 2`, with
and without gathering light load on one process (`--spread-above`), under
wrk at c=1..64 and under hey at two fixed rates (the same load for each),
N rounds round-robin.

`--interleaved N` instead starts every proxy at once and runs the c=64
keep-alive load N times round-robin across them, so slow drifts of a shared
machine hit every target alike: the fairest source for the c=64 ratios.
`--new-connections N` does the same for new connections: CONNECT setups/s,
hey through CONNECT to a TLS origin, and hey with a new connection per
plain request, with each proxy's CPU split into user and system time and
the machine's idle share. Both end with each proxygate target's ratios to
the bars' peers (squid, tinyproxy) taken round by round: on a noisy machine
the median of those is the figure to quote, not a ratio of two medians.

Numbers are medians over --runs; the markdown table goes to stdout and
bench/out/proxy-latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / "bench" / ".venv" / "bin"
SMALL_BODY = "hello world, this is a small response.\n"
ONE_MIB = 1 << 20
BULK = 64 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_argv(port: int, *flags: str) -> list[str]:
    """The command line of a proxygate gateway on 127.0.0.1:port (shared by every benchmark)."""
    return [sys.executable, "-m", "proxygate", "gateway", "--listen", f"127.0.0.1:{port}", *flags]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def tree_pids(pid: int) -> list[int]:
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pids
    for child in children:
        pids += tree_pids(int(child))
    return pids


def peak_rss_mib(pid: int) -> float:
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# ---- origin ---------------------------------------------------------------------


def _run_nginx(folder: Path, port: int, server: str) -> subprocess.Popen:
    """One nginx (a single worker, no access log) serving `server` on 127.0.0.1:port from `folder`."""
    conf = folder / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1; daemon off; master_process off;
pid {folder}/nginx.pid; error_log {folder}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000; keepalive_timeout 120s;
  client_body_temp_path {folder}/cb; proxy_temp_path {folder}/pt; fastcgi_temp_path {folder}/ft;
  uwsgi_temp_path {folder}/ut; scgi_temp_path {folder}/st;
  default_type application/octet-stream;
  server {{
    {server}
    location = /small {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
  }}
}}
"""
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(folder)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def start_nginx(work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    docroot = work / "www"
    docroot.mkdir()
    (docroot / "1m").write_bytes(os.urandom(ONE_MIB))
    with open(docroot / "big", "wb") as fh:
        block = os.urandom(ONE_MIB)
        for _ in range(BULK // ONE_MIB):
            fh.write(block)
    return _run_nginx(work, port, f"listen 127.0.0.1:{port} backlog=4096; root {docroot};"), port


def start_tls_origin(work: Path) -> tuple[subprocess.Popen, int]:
    """A second nginx serving /small over TLS (self-signed): the far end of CONNECT tunnels for hey."""
    port = free_port()
    tls = work / "tls"
    tls.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem")],
        check=True,
        capture_output=True,
    )
    server = (
        f"listen 127.0.0.1:{port} ssl backlog=4096; ssl_certificate {tls}/cert.pem; ssl_certificate_key {tls}/key.pem;"
    )
    return _run_nginx(tls, port, server), port


# ---- proxies ----------------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self, work: Path) -> None:
        log = open(work / f"{self.name}.log", "wb")
        # A process group of its own (stopped as one), but not a session of its
        # own: with the kernel's autogroup scheduling (on here) each session
        # shares the CPUs as one unit, which caps a multi-process proxy at the
        # share of one process against wrk and nginx in the other session
        # (measured: proxygate --workers 2 did 21-22k req/s in its own session
        # against 25-26k in ours; squid, one process, was unaffected).
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, process_group=0
        )
        wait_port(self.port, 30)
        time.sleep(0.3)

    def stop(self) -> float:
        assert self.proc is not None
        rss = peak_rss_mib(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return rss


def proxygate_flags(work: Path) -> tuple[str, ...]:
    """Any destination on loopback, no blocklist, and the memory limiter checking every
    request with a budget the load never exhausts."""
    open_policy = ("--connect-ports", "*", "--deny-destinations", "", "--blocklist", str(work / "none.json"))
    return (*open_policy, "-rate-limit", "1000000000", "-rate-burst", "1000000000")


def make_proxies(work: Path, only: set[str] | None, baseline_src: str = "", baseline_workers: int = 1) -> list[Proxy]:
    proxies: list[Proxy] = []

    def want(name: str) -> bool:
        return only is None or name in only

    # "proxygate" is the default (`--workers auto`: one process per CPU); the others pin the count.
    for name, workers in (
        ("proxygate", ()),
        ("proxygate-1p", ("--workers", "1")),
        ("proxygate-2p", ("--workers", "2")),
    ):
        if want(name):
            port = free_port()
            argv = gateway_argv(port, *proxygate_flags(work), *workers)
            proxies.append(Proxy(name, argv, port))
    if baseline_src:
        # Another checkout's src/ (an earlier commit, say), for before/after in one run.
        port = free_port()
        argv = gateway_argv(port, *proxygate_flags(work), "--workers", str(baseline_workers))
        proxies.append(Proxy("proxygate-baseline", argv, port, env={"PYTHONPATH": baseline_src}))
    if want("tinyproxy") and shutil.which("tinyproxy"):
        port = free_port()
        conf = work / "tinyproxy.conf"
        conf.write_text(
            f"User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 600\n"
            "MaxClients 512\nLogLevel Critical\nDisableViaHeader No\n"
        )
        proxies.append(Proxy("tinyproxy", ["tinyproxy", "-d", "-c", str(conf)], port))
    if want("squid") and shutil.which("squid"):
        port = free_port()
        sq = work / "squid"
        sq.mkdir(mode=0o777)
        os.chmod(sq, 0o777)
        conf = sq / "squid.conf"
        conf.write_text(
            f"http_port 127.0.0.1:{port}\nhttp_access allow all\ncache deny all\ncache_mem 0 MB\n"
            f"access_log {sq}/access.log squid\ncache_log {sq}/cache.log\npid_filename {sq}/squid.pid\n"
            f"coredump_dir {sq}\nshutdown_lifetime 0 seconds\nmax_filedescriptors 8192\n"
        )
        proxies.append(Proxy("squid", ["squid", "-N", "-f", str(conf)], port))
    if want("pproxy") and (BENCH_VENV / "pproxy").exists():
        port = free_port()
        proxies.append(Proxy("pproxy", [str(BENCH_VENV / "pproxy"), "-l", f"http://127.0.0.1:{port}"], port))
    if want("proxy.py") and (BENCH_VENV / "proxy").exists():
        port = free_port()
        proxies.append(
            Proxy(
                "proxy.py",
                [str(BENCH_VENV / "proxy"), "--hostname", "127.0.0.1", "--port", str(port)],
                port,
            )
        )
    return proxies


# ---- load: wrk ------------------------------------------------------------------


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m, text
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]


def _bytes(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(B|KB|MB|GB)", text)
    assert m, text
    return float(m.group(1)) * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[m.group(2)]


def wrk(
    url: str,
    proxy_port: int | None,
    conns: int,
    duration: float,
    work: Path,
    close: bool = False,
    headers: tuple[str, ...] = (),
) -> dict[str, float]:
    threads = 1 if conns == 1 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s"]
    if close:
        cmd += ["-H", "Connection: close"]
    for header in headers:
        cmd += ["-H", header]
    if proxy_port is None:
        cmd.append(url)
    else:
        script = work / "absolute.lua"
        script.write_text(f'wrk.path = "{url}"\n')
        cmd += ["-s", str(script), f"http://127.0.0.1:{proxy_port}/"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    out = proc.stdout
    if "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed: {' '.join(cmd)}\n{out}\n{proc.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _seconds(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    transfer = _bytes(re.search(r"Transfer/sec:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": p50 * 1e3,
        "p99_ms": p99 * 1e3,
        "mb_s": transfer / 1e6,
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": sock_err.group(1) if sock_err else "",  # type: ignore[dict-item]
    }


# ---- load: CONNECT ----------------------------------------------------------------


async def _connect_once(proxy_port: int, origin_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(head[:80])
    writer.close()


async def connect_rate(proxy_port: int, origin_port: int, duration: float, conc: int = 16) -> float:
    done = 0
    deadline = time.monotonic() + duration

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await _connect_once(proxy_port, origin_port)
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(conc)))
    return done / (time.monotonic() - start)


async def tunnel_bulk(proxy_port: int | None, origin_port: int) -> float:
    """MB/s of one 64 MiB download inside one tunnel (or direct)."""
    port = proxy_port or origin_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    if proxy_port is not None:
        writer.write(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
    start = time.monotonic()
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = 0
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        got += len(data)
    elapsed = time.monotonic() - start
    writer.close()
    if got < BULK:
        raise RuntimeError(f"short bulk read {got}")
    return got / elapsed / 1e6


# ---- load: new connections (hey) ----------------------------------------------------


def hey(url: str, proxy_port: int, duration: float, conc: int = 16) -> float:
    """req/s of `hey -disable-keepalive -x proxy url`: a new client connection per request.

    For an https URL every request is a new CONNECT tunnel with a TLS
    handshake inside (hey does not verify the origin's certificate)."""
    out = _run_hey(url, proxy_port, duration, conc, "-disable-keepalive")
    if re.search(r"\[200\]\s+(\d+) responses", out) is None:
        raise RuntimeError(f"hey got no 200 through port {proxy_port}:\n{out[-2000:]}")
    return _hey_rate(out)


def _run_hey(url: str, proxy_port: int, duration: float, conc: int, *flags: str) -> str:
    """hey's report of `duration` seconds through the proxy, `conc` at a time."""
    cmd = ["hey", "-z", f"{max(1, round(duration))}s", "-c", str(conc), *flags]
    cmd += ["-x", f"http://127.0.0.1:{proxy_port}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    if "Requests/sec" not in out:
        raise RuntimeError(f"hey failed: {' '.join(cmd)}\n{out[-2000:]}")
    return out


def _hey_rate(out: str) -> float:
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match is not None  # checked by _run_hey
    return float(match.group(1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (a multi-process proxy's tree)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its children."""
    user = system = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def machine_idle() -> tuple[int, int]:
    """The machine's idle (and I/O wait) time and its total time so far, in clock ticks (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def new_connections(proxies: list[Proxy], origin_port: int, args: argparse.Namespace, work: Path) -> str:
    """New connections only, `args.new_connections` rounds round-robin over every proxy started at once:
    CONNECT setups/s (uvloop client), hey through CONNECT to a TLS origin, hey absolute-form
    with a new connection per request, and each proxy's CPU per CONNECT setup and per hey request."""
    tls_proc, tls_port = start_tls_origin(work)
    small = f"http://127.0.0.1:{origin_port}/small"
    secure = f"https://127.0.0.1:{tls_port}/small"
    keys = ("connect", "cpu_us", "hey_tls", "cpu_tls", "hey_http", "cpu_http")
    # For each hey run also: the CPU split into user and system time, and how much
    # of the machine stayed idle (a saturated machine leaves ~0 %).
    split_keys = tuple(f"{k}_{part}" for k in ("tls", "http") for part in ("user", "sys", "idle"))
    runs: dict[str, dict[str, list[float]]] = {p.name: {k: [] for k in keys + split_keys} for p in proxies}
    for proxy in proxies:
        proxy.start(work)
    try:
        for _ in range(args.new_connections):
            for proxy in proxies:
                assert proxy.proc is not None
                r = runs[proxy.name]
                cpu0, t0 = cpu_seconds(proxy.proc.pid), time.monotonic()
                rate = uvloop_run(connect_rate(proxy.port, origin_port, args.duration))
                cpu = cpu_seconds(proxy.proc.pid) - cpu0
                r["connect"].append(rate)
                r["cpu_us"].append(cpu / (rate * (time.monotonic() - t0)) * 1e6)
                for url, kind in ((secure, "tls"), (small, "http")):
                    (user0, sys0), idle0, t0 = cpu_split(proxy.proc.pid), machine_idle(), time.monotonic()
                    rate = hey(url, proxy.port, args.duration)
                    (user1, sys1), idle1 = cpu_split(proxy.proc.pid), machine_idle()
                    requests = rate * (time.monotonic() - t0)
                    r[f"hey_{kind}"].append(rate)
                    r[f"cpu_{kind}"].append((user1 - user0 + sys1 - sys0) / requests * 1e6)
                    r[f"{kind}_user"].append((user1 - user0) / requests * 1e6)
                    r[f"{kind}_sys"].append((sys1 - sys0) / requests * 1e6)
                    r[f"{kind}_idle"].append((idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1]) * 100)
    finally:
        for proxy in proxies:
            proxy.stop()
        tls_proc.send_signal(signal.SIGTERM)
        tls_proc.wait(10)
    lines = [
        "| target | CONNECT/s (uvloop client) | CPU µs per CONNECT | hey https via CONNECT req/s | CPU µs each "
        "| hey http, new conn per req req/s | CPU µs each |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        cells = [f"{statistics.median(r[k]):.0f} ({', '.join(f'{v:.0f}' for v in r[k])})" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "CPU per hey request split into user and system time, and the machine's idle share during the run (medians):",
        "",
        "| target | https: user µs | system µs | machine idle | http: user µs | system µs | machine idle |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        cells = [f"{statistics.median(r[k]):.0f}" + (" %" if k.endswith("idle") else "") for k in split_keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + paired_ratios(runs, NEW_CONNECTION_BARS))


# The bars, each measure against the peer it is compared with: (measure, peer, column title).
Bars = tuple[tuple[str, str, str], ...]
NEW_CONNECTION_BARS: Bars = (
    ("connect", "squid", "CONNECT/s ÷ squid"),
    ("hey_tls", "squid", "hey https ÷ squid"),
    ("hey_http", "tinyproxy", "hey http, new conn per request ÷ tinyproxy"),
)
KEEP_ALIVE_BARS: Bars = (
    ("rps", "squid", "c=64 req/s ÷ squid"),
    ("p99_ms", "squid", "p99 ÷ squid's"),
    ("cpu_us", "squid", "CPU per request ÷ squid's"),
)


def paired_ratios(runs: dict[str, dict[str, list[float]]], bars: Bars) -> list[str]:
    """Each proxygate target against the bars' peers, round by round: a round's targets run
    seconds apart, so a drift of the shared machine moves both sides of a ratio alike
    (the medians of the table above can come from different rounds)."""
    bars = tuple((key, peer, title) for key, peer, title in bars if peer in runs)
    targets = [name for name in runs if name.startswith("proxygate")]
    if not bars or not targets:
        return []
    lines = [
        "",
        "Round by round against the bars' peers (median of the rounds' ratios; each round's in brackets):",
        "",
        "| target | " + " | ".join(title for _, _, title in bars) + " |",
        "|---|" + "---|" * len(bars),
    ]
    for name in targets:
        cells = []
        for key, peer, _ in bars:
            ratios = [ours / theirs for ours, theirs in zip(runs[name][key], runs[peer][key], strict=True) if theirs]
            cells.append(f"{statistics.median(ratios):.2f} ({', '.join(f'{v:.2f}' for v in ratios)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def uvloop_run(coro: Any) -> float:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)  # type: ignore[no-any-return]


# ---- driver ---------------------------------------------------------------------


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_target(name: str, proxy_port: int | None, origin_port: int, args: argparse.Namespace, work: Path) -> dict:
    result: dict[str, object] = {"name": name}
    small = f"http://127.0.0.1:{origin_port}/small"
    big = f"http://127.0.0.1:{origin_port}/1m"
    for conns in (1, 16, 64):
        runs = [wrk(small, proxy_port, conns, args.duration, work) for _ in range(args.runs)]
        result[f"c{conns}"] = {k: median_of(runs, k) for k in ("rps", "p50_ms", "p99_ms", "errors")}
    runs = [wrk(small, proxy_port, 64, args.duration, work, close=True) for _ in range(args.runs)]
    result["c64_close_rps"] = median_of(runs, "rps")
    runs = [wrk(big, proxy_port, 16, args.duration, work) for _ in range(args.runs)]
    result["1mib_mb_s"] = median_of(runs, "mb_s")
    if proxy_port is not None:
        rates = [asyncio.run(connect_rate(proxy_port, origin_port, args.duration)) for _ in range(args.runs)]
        result["connect_per_s"] = statistics.median(rates)
    bulks = [asyncio.run(tunnel_bulk(proxy_port, origin_port)) for _ in range(args.runs)]
    result["tunnel_mb_s"] = statistics.median(bulks)
    return result


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    lines = [
        "| target | c=1 req/s | c=1 p50/p99 ms | c=16 req/s | c=16 p99 ms | c=64 req/s | c=64 p50/p99 ms "
        "| c=64 new conn/req req/s | 1 MiB MB/s | CONNECT/s | tunnel MB/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c1, c16, c64 = r["c1"], r["c16"], r["c64"]
        lines.append(
            f"| {r['name']} | {c1['rps']:.0f} | {c1['p50_ms']:.2f}/{c1['p99_ms']:.2f} | {c16['rps']:.0f} "
            f"| {c16['p99_ms']:.2f} | {c64['rps']:.0f} | {c64['p50_ms']:.2f}/{c64['p99_ms']:.2f} "
            f"| {r['c64_close_rps']:.0f} | {r['1mib_mb_s']:.0f} | {_num(r.get('connect_per_s'), '.0f')} | {r['tunnel_mb_s']:.0f} "
            f"| {_num(r.get('rss_mib'), '.1f')} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    peers = [r for r in results if not r["name"].startswith("proxygate") and r["name"] != "direct"]
    ours = [r for r in results if r["name"].startswith("proxygate")]
    if not peers or not ours:
        return ""
    best64 = max(peers, key=lambda r: r["c64"]["rps"])
    best_close = max(peers, key=lambda r: r["c64_close_rps"])
    best_p99 = min(peers, key=lambda r: r["c64"]["p99_ms"])
    best_1m = max(peers, key=lambda r: r["1mib_mb_s"])
    best_tun = max(peers, key=lambda r: r["tunnel_mb_s"])
    best_conn = max(peers, key=lambda r: r.get("connect_per_s", 0))
    lines = []
    for r in ours:
        n = r["name"]
        lines += [
            f"- {n}: c=64 req/s / best peer ({best64['name']}) = {r['c64']['rps'] / best64['c64']['rps']:.2f}×",
            f"- {n}: c=64, new connection per request / best peer ({best_close['name']}) = "
            f"{r['c64_close_rps'] / best_close['c64_close_rps']:.2f}×",
            f"- {n}: c=64 p99 {r['c64']['p99_ms']:.2f} ms vs best peer ({best_p99['name']}) "
            f"{best_p99['c64']['p99_ms']:.2f} ms",
            f"- {n}: 1 MiB MB/s / best peer ({best_1m['name']}) = {r['1mib_mb_s'] / best_1m['1mib_mb_s']:.2f}×",
            f"- {n}: tunnel MB/s / best peer ({best_tun['name']}) = {r['tunnel_mb_s'] / best_tun['tunnel_mb_s']:.2f}×",
            f"- {n}: CONNECT/s / best peer ({best_conn['name']}) = "
            f"{r['connect_per_s'] / best_conn['connect_per_s']:.2f}×",
        ]
    return "\n".join(lines)


def interleaved(proxies: list[Proxy], origin_port: int, args: argparse.Namespace, work: Path) -> str:
    """c=64 keep-alive small responses, `args.interleaved` rounds across all proxies started at once."""
    small = f"http://127.0.0.1:{origin_port}/small"
    runs: dict[str, list[dict[str, float]]] = {p.name: [] for p in proxies}
    for proxy in proxies:
        proxy.start(work)
    try:
        for _ in range(args.interleaved):
            for proxy in proxies:
                assert proxy.proc is not None
                cpu0 = cpu_seconds(proxy.proc.pid)
                run = wrk(small, proxy.port, 64, args.duration, work)
                run["cpu_us"] = (cpu_seconds(proxy.proc.pid) - cpu0) / (run["rps"] * args.duration) * 1e6
                runs[proxy.name].append(run)
    finally:
        for proxy in proxies:
            proxy.stop()
    lines = [
        "| target | c=64 req/s (median) | runs | p50 ms | p99 ms | p99 runs | CPU µs per request |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        each = ", ".join(f"{r['rps']:.0f}" for r in rs)
        p99s = ", ".join(f"{r['p99_ms']:.1f}" for r in rs)
        lines.append(
            f"| {name} | {median_of(rs, 'rps'):.0f} | {each} | {median_of(rs, 'p50_ms'):.2f} "
            f"| {median_of(rs, 'p99_ms'):.2f} | {p99s} | {median_of(rs, 'cpu_us'):.0f} |"
        )
    by_measure = {name: {key: [r[key] for r in rs] for key in ("rps", "p99_ms", "cpu_us")} for name, rs in runs.items()}
    return "\n".join(lines + paired_ratios(by_measure, KEEP_ALIVE_BARS))


def hey_at_rate(url: str, proxy_port: int, conns: int, rate: int, duration: float) -> dict[str, float]:
    """`hey` at a fixed total rate over `conns` kept-alive connections: the same load whatever the proxy."""
    out = _run_hey(url, proxy_port, duration, conns, "-q", str(rate // conns))
    p99 = re.search(r"99%+ in ([\d.]+) secs", out)
    if p99 is None:
        raise RuntimeError(f"hey reported no latencies through port {proxy_port}:\n{out[-2000:]}")
    return {"rps": _hey_rate(out), "p99_ms": float(p99.group(1)) * 1e3}


SWEEP_WRK = (1, 8, 16, 32, 64)  # wrk connections, closed loop
SWEEP_RATES = ((16, 8000), (64, 16000))  # hey: connections, total req/s (one process has room for both)


def workers_sweep(origin_port: int, args: argparse.Namespace, work: Path) -> str:
    """One process against `--workers 2` with and without load steering (`--spread-above`), at
    several loads, `args.workers_sweep` rounds round-robin over the three started at once."""
    flags = {
        "one process": ("--workers", "1"),
        "--workers 2 --spread-above 0": ("--workers", "2", "--spread-above", "0"),
        "--workers 2": ("--workers", "2"),
    }
    proxies = []
    for name, extra in flags.items():
        port = free_port()
        proxies.append(Proxy(name, gateway_argv(port, *proxygate_flags(work), *extra), port))
    small = f"http://127.0.0.1:{origin_port}/small"

    def closed_loop(conns: int) -> Callable[[int], dict[str, float]]:
        return lambda port: wrk(small, port, conns, args.duration, work)

    def fixed_rate(conns: int, rate: int) -> Callable[[int], dict[str, float]]:
        return lambda port: hey_at_rate(small, port, conns, rate, args.duration)

    # Each load by its row label: how to apply it through a proxy's port.
    loads = {f"wrk c={c}": closed_loop(c) for c in SWEEP_WRK}
    loads.update({f"hey c={c} at {r} req/s": fixed_rate(c, r) for c, r in SWEEP_RATES})
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for proxy in proxies:
        proxy.start(work)
    try:
        for _ in range(args.workers_sweep):
            for load, measure in loads.items():
                for proxy in proxies:
                    runs.setdefault((load, proxy.name), []).append(measure(proxy.port))
    finally:
        for proxy in proxies:
            proxy.stop()
    lines = ["| load | " + " | ".join(f"{p.name}: req/s, p99 ms (rounds)" for p in proxies) + " |"]
    lines.append("|---" * (len(proxies) + 1) + "|")
    for load in loads:
        cells = []
        for proxy in proxies:
            rs = runs[(load, proxy.name)]
            each = ", ".join(f"{r['p99_ms']:.2f}" for r in rs)
            cells.append(f"{median_of(rs, 'rps'):.0f}, {median_of(rs, 'p99_ms'):.2f} ({each})")
        lines.append(f"| {load} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--only",
        default="",
        help="comma list of targets (direct,proxygate,proxygate-1p,proxygate-2p,tinyproxy,squid,pproxy,proxy.py)",
    )
    parser.add_argument("--json", default="", help="also write raw results here")
    parser.add_argument("--interleaved", type=int, default=0, help="only c=64 keep-alive, N rounds round-robin")
    parser.add_argument(
        "--new-connections", type=int, default=0, help="only new-connection measures, N rounds round-robin"
    )
    parser.add_argument(
        "--baseline-src", default="", help="also run proxygate from this src/ directory (before/after in one run)"
    )
    parser.add_argument("--baseline-workers", type=int, default=1, help="--workers of the --baseline-src gateway")
    parser.add_argument(
        "--workers-sweep",
        type=int,
        default=0,
        help="only one process against --workers 2 (gathering light load, and not) at several loads, N rounds",
    )
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install -y nginx-light wrk")
    only = set(args.only.split(",")) if args.only else None
    results = []
    with tempfile.TemporaryDirectory(prefix="pgbench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o777)
        nginx, origin_port = start_nginx(work)
        if args.workers_sweep:
            try:
                print(workers_sweep(origin_port, args, work))
            finally:
                nginx.send_signal(signal.SIGTERM)
                nginx.wait(10)
            return 0
        if args.interleaved or args.new_connections:
            run = interleaved if args.interleaved else new_connections
            try:
                out = run(make_proxies(work, only, args.baseline_src, args.baseline_workers), origin_port, args, work)
            finally:
                nginx.send_signal(signal.SIGTERM)
                nginx.wait(10)
            print(out)
            return 0
        try:
            if only is None or "direct" in only:
                results.append(bench_target("direct", None, origin_port, args, work))
                print("direct done", file=sys.stderr)
            for proxy in make_proxies(work, only, args.baseline_src, args.baseline_workers):
                proxy.start(work)
                try:
                    res = bench_target(proxy.name, proxy.port, origin_port, args, work)
                finally:
                    res["rss_mib"] = proxy.stop()
                results.append(res)
                print(f"{proxy.name} done", file=sys.stderr)
        finally:
            nginx.send_signal(signal.SIGTERM)
            nginx.wait(10)
    out = f"{table(results)}\n\n{ratios(results)}\n"
    print(out)
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "proxy-latest.md").write_text(out)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
