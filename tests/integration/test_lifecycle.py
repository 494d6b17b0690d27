"""Blocklist reloads, TLS listener, logs and metrics, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import requests

from tests.conftest import require_binary
from tests.support.gateway import BackgroundGet, GatewayProcess, RawResponses, stop_with_requests_queued
from tests.support.origin import Origin
from tests.support.waiting import wait_for


def status_via(gw: GatewayProcess, url: str) -> int:
    return requests.get(url, proxies={"http": gw.proxy}, timeout=10).status_code


def test_blocked_http_gets_html_page(gateway: GatewayProcess) -> None:
    r = requests.get("http://blocked.test/some/path", proxies={"http": gateway.proxy}, timeout=10)
    assert r.status_code == 403
    assert r.headers["Content-Type"].startswith("text/html") and "blocked.test" in r.text
    r = requests.get("http://deep.sub.ads.test/", proxies={"http": gateway.proxy}, timeout=10)
    assert r.status_code == 403
    metrics = requests.get(f"{gateway.proxy}/metrics", timeout=10).text
    assert "proxy_blocked_requests_total 2.0" in metrics


def test_reload_by_sighup_and_by_file_edit(start_gateway, tmp_path: Path, origin: Origin) -> None:
    path = tmp_path / "reload.json"
    path.write_text(json.dumps({"blocked_domains": []}))
    gw = start_gateway(blocklist=path)
    url = f"http://localhost:{origin.port}/hello"
    assert status_via(gw, url) == 200

    # Edit + SIGHUP: applied at once.
    path.write_text(json.dumps({"blocked_domains": ["localhost"]}))
    gw.signal(signal.SIGHUP)
    gw.wait_log("blocklist reloaded: 1 entries")
    assert status_via(gw, url) == 403

    # A broken file keeps the old list and logs an error.
    path.write_text("{broken")
    gw.signal(signal.SIGHUP)
    gw.wait_log("blocklist reload failed, keeping 1 entries")
    assert status_via(gw, url) == 403

    # A plain edit is noticed by the file watch (no signal).
    tmp = tmp_path / "new.json"
    tmp.write_text(json.dumps({"blocked_domains": ["other.test", "*.x.test"]}))
    os.replace(tmp, path)
    gw.wait_log("blocklist reloaded: 2 entries", timeout=10)
    assert status_via(gw, url) == 200


def test_missing_blocklist_is_a_warning(start_gateway, tmp_path: Path) -> None:
    gw = start_gateway(blocklist=tmp_path / "absent.json")
    gw.wait_log("not found; starting without it")
    assert requests.get(f"{gw.proxy}/healthz", timeout=5).status_code == 200


def test_access_log_fields_json_and_text(start_gateway, origin: Origin) -> None:
    gw = start_gateway()
    requests.get(f"{origin.url}/bytes/1234", proxies={"http": gw.proxy}, headers={"X-Request-ID": "abc-1"}, timeout=10)
    line = gw.wait_log(r'\{[^\n]*"request_id":"abc-1"[^\n]*\}')
    entry = json.loads(line)
    assert entry["status"] == 200 and entry["method"] == "GET" and entry["path"] == "/bytes/1234"
    assert entry["host"] == f"127.0.0.1:{origin.port}" and entry["client_ip"] == "127.0.0.1"
    assert entry["duration_ms"] >= 0 and entry["bytes_out"] > 1234
    text_gw = start_gateway("-log-format", "text", "-debug")
    requests.get(f"{text_gw.proxy}/healthz", headers={"X-Request-ID": "abc-2"}, timeout=10)
    text_gw.wait_log(r"127\.0\.0\.1 abc-2 GET [^ ]*/healthz 200")
    assert "DEBUG" in text_gw.log() or "INFO" in text_gw.log()


def test_metrics_names(gateway: GatewayProcess, origin: Origin) -> None:
    requests.get(f"{origin.url}/hello", proxies={"http": gateway.proxy}, timeout=10)
    text = requests.get(f"{gateway.proxy}/metrics", timeout=10).text
    for name in (
        "proxy_requests_total",
        "proxy_blocked_requests_total",
        "proxy_request_duration_seconds_bucket",
        "proxy_active_connections",
        "proxy_requests_by_status_class_total",
        "proxy_tunnels_total",
        "proxy_tunnel_bytes_total",
    ):
        assert name in text, name
    assert 'proxy_requests_total{method="GET",status="200"}' in text
    assert requests.get(f"{gateway.proxy}/readyz", timeout=5).status_code == 200


def test_https_listener(
    start_gateway, server_cert_files: tuple[str, str], ca_file: str, origin: Origin, tls_origin: Origin
) -> None:
    pem, key = server_cert_files
    gw = start_gateway("-proto", "https", "-pem", pem, "-key", key)
    curl = require_binary("curl", "curl")
    proxy = f"https://127.0.0.1:{gw.port}"
    out = subprocess.run(
        [curl, "-sS", "--proxy-cacert", ca_file, "-x", proxy, f"{origin.url}/hello"], capture_output=True, timeout=20
    )
    assert out.returncode == 0 and out.stdout == b"hello", out.stderr
    # TLS inside TLS: CONNECT over the TLS listener to the TLS origin.
    out = subprocess.run(
        [curl, "-sS", "--proxy-cacert", ca_file, "--cacert", ca_file, "-x", proxy, f"{tls_origin.url}/hello"],
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0 and out.stdout == b"hello", out.stderr
    out = subprocess.run([curl, "-sS", "--cacert", ca_file, f"{proxy}/healthz"], capture_output=True, timeout=20)
    assert b"ok" in out.stdout


def test_graceful_shutdown_finishes_slow_download(start_gateway, origin: Origin) -> None:
    gw = start_gateway("-shutdown-timeout", "20s")
    download = BackgroundGet(gw, f"{origin.url}/slow/10/3")
    download.wait_started()
    # An idle keep-alive connection (answered once, nothing more sent) is closed at once.
    idle = gw.connect()
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, _, _ = RawResponses(idle).next()
    assert status == 200
    gw.signal(signal.SIGTERM)
    gw.wait_log("shutting down")

    def refused() -> bool:
        try:
            requests.get(f"{gw.proxy}/healthz", timeout=2)
        except requests.ConnectionError:
            return True
        return False

    wait_for(refused, "new connections refused while draining", timeout=5)
    idle.settimeout(5)
    assert idle.recv(10) == b""
    result = download.join()
    assert result.get("status") == 200 and result.get("chunks") == 10, result
    assert gw.proc.wait(20) == 0


def test_requests_waiting_in_the_accept_queue_at_a_stop_are_answered(start_gateway) -> None:
    """Closing the listener would reset every connection the kernel completed and the
    process had not accepted yet; a stop under load finds many so."""
    gw = start_gateway("--workers", "1")
    results = stop_with_requests_queued(gw, [gw.proc.pid], 40)
    assert results == [200] * 40
    assert gw.proc.wait(20) == 0


def test_tls_clients_waiting_in_the_accept_queue_at_a_stop_are_answered(
    start_gateway, server_cert_files: tuple[str, str], ca_file: str
) -> None:
    """Over TLS a queued client can send its request only after the handshake, which ends
    after the stop began (the gateway does it when it takes the connection): its request is
    waited for and answered."""
    pem, key = server_cert_files
    gw = start_gateway("--workers", "1", "-proto", "https", "-pem", pem, "-key", key)
    ctx = ssl.create_default_context(cafile=ca_file)
    connected: list[socket.socket] = []
    results: list[int | str] = []

    def client() -> None:
        try:
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            connected.append(raw)  # in the accept queue: the gateway is stopped
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                results.append(RawResponses(tls).next()[0])
        except OSError as exc:
            results.append(type(exc).__name__)

    os.kill(gw.proc.pid, signal.SIGSTOP)
    threads = [threading.Thread(target=client) for _ in range(10)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(connected) == 10, "10 clients connected")
    finally:
        gw.signal(signal.SIGTERM)
        os.kill(gw.proc.pid, signal.SIGCONT)
    for thread in threads:
        thread.join(20)
    assert results == [200] * 10
    assert gw.proc.wait(20) == 0


def test_shutdown_timeout_cuts_what_is_left(start_gateway, origin: Origin) -> None:
    gw = start_gateway("-shutdown-timeout", "1s")
    download = BackgroundGet(gw, f"{origin.url}/slow/10/6")
    download.wait_started()
    start = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(20) == 0
    assert time.monotonic() - start < 5
    result = download.join()
    assert "error" in result or result.get("chunks", 10) < 10  # type: ignore[operator]
