from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from proxygate.config import GatewaySettings, parse_duration, parse_ports, settings_from_args


@pytest.mark.parametrize(
    "text, seconds",
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5s", 1.5), ("10", 10), ("0", 0), ("2m3.5s", 123.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "", "s", "1h 30m", "-5s", "ms5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults_match_the_seed() -> None:
    s = settings_from_args([], environ={})
    assert s == GatewaySettings()
    assert s.listen == ("", 8080) and s.limiter == "memory" and s.rate_limit == 100 and s.rate_burst == 20
    assert s.read_timeout == 30 and s.write_timeout == 60 and s.idle_timeout == 120
    assert s.inference_timeout == 300 and s.shutdown_timeout == 30 and s.dial_timeout == 10
    assert s.connect_ports == frozenset({443})
    assert ipaddress.ip_network("169.254.0.0/16") in s.deny_destinations
    assert s.workers == len(os.sched_getaffinity(0)) and s.spread_above == 32


def test_both_spellings_equals_and_env() -> None:
    s = settings_from_args(
        ["-worker-addrs", "a:1,b:2", "--read-timeout=5s", "-debug", "-proto=http", "--connect-ports", "443,8000-8002"],
        environ={"PROXYGATE_RATE_LIMIT": "7", "PROXYGATE_LISTEN": "127.0.0.1:9000"},
    )
    assert s.worker_addrs == ("a:1", "b:2")
    assert s.read_timeout == 5 and s.debug is True
    assert s.rate_limit == 7 and s.listen == ("127.0.0.1", 9000)
    assert s.connect_ports == frozenset({443, 8000, 8001, 8002})
    assert settings_from_args(["-debug=false"], environ={}).debug is False
    assert settings_from_args(["--deny-destinations", ""], environ={}).deny_destinations == ()
    assert parse_ports("*") is None


@pytest.mark.parametrize(
    "args, flag",
    [
        (["-proto", "ftp"], "-proto"),
        (["-read-timeout", "5x"], "-read-timeout"),
        (["-rate-limit", "abc"], "-rate-limit"),
        (["--listen", "nope"], "-listen"),
        (["--connect-ports", "0"], "-connect-ports"),
        (["--trusted-proxies", "10.0.0.0/99"], "-trusted-proxies"),
        (["-proto", "https"], "-proto"),
        (["--workers", "0"], "-workers"),
        (["--workers", "300"], "-workers"),
    ],
)
def test_bad_values_exit_2_with_one_line(args: list[str], flag: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxygate", "gateway", *args], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], out.stderr


def test_bad_env_value_exits_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxygate", "gateway"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PROXYGATE_IDLE_TIMEOUT": "soon", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and "PROXYGATE_IDLE_TIMEOUT" in out.stderr


def test_help_lists_every_flag_with_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxygate", "gateway", "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    for flag in (
        "-proto",
        "-pem",
        "-key",
        "-debug",
        "-limiter",
        "-redis-addr",
        "-rate-limit",
        "-rate-burst",
        "-worker-addrs",
        "-log-format",
        "-read-timeout",
        "-write-timeout",
        "-idle-timeout",
        "-dial-timeout",
        "-inference-timeout",
        "-shutdown-timeout",
        "--listen",
        "--blocklist",
        "--connect-ports",
        "--deny-destinations",
        "--trusted-proxies",
    ):
        assert flag in out.stdout, flag
    assert "default '30s'" in out.stdout


def test_workers_auto_is_one_per_usable_cpu() -> None:
    assert settings_from_args(["--workers", "auto"], environ={}).workers == len(os.sched_getaffinity(0))
    assert settings_from_args([], environ={"PROXYGATE_WORKERS": "3"}).workers == 3


def test_worker_quantize_choices() -> None:
    from proxygate.config import worker_settings_from_args

    assert worker_settings_from_args(["--quantize", "int4"], {}).quantize == "int4"
    assert worker_settings_from_args([], {}).quantize == "none"
    with pytest.raises(SystemExit):  # argparse: a clear message, exit status 2
        worker_settings_from_args(["--quantize", "int3"], {})
