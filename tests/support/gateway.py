"""Start the real gateway as a subprocess on 127.0.0.1:0 and find its port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

LISTENING = re.compile(r"listening on (https?)://127\.0\.0\.1:(\d+)")

# Loopback origins need these; the policy tests start gateways without them.
OPEN_POLICY = ("--connect-ports", "*", "--deny-destinations", "")
# The memory limiter stays on in every test, with a budget no test exhausts
# (rate-limit tests pass their own -rate-limit/-rate-burst, which come later and win).
GENEROUS_LIMITS = ("-rate-limit", "1000000", "-rate-burst", "1000000")


class GatewayProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxygate", "gateway", "--listen", "127.0.0.1:0", *GENEROUS_LIMITS, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        self._sockets: list[socket.socket] = []
        self.port = self._wait_listening()
        self.proxy = f"http://127.0.0.1:{self.port}"

    def _wait_listening(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                return int(match.group(2))
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not start listening:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match.group(0)
            time.sleep(0.05)
        raise AssertionError(f"log never matched {pattern!r}:\n{self.log()[-3000:]}")

    def connect(self) -> socket.socket:
        """A raw client socket to the gateway, closed at the latest when the gateway stops."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self._sockets.append(sock)
        return sock

    def rss_kib(self) -> int:
        return _status_field(self.proc.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return _status_field(self.proc.pid, "VmHWM")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        for sock in self._sockets:
            sock.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"gateway died:\n{self.log()[-3000:]}"


def stop_with_requests_queued(gw: GatewayProcess, pids: list[int], clients: int) -> list[int | str]:
    """Stop the gateway while `clients` connections, each with its request sent, wait in
    the kernel's accept queue: every process in `pids` is suspended (SIGSTOP) while they
    connect, then the gateway gets SIGTERM and they all resume. Each client's status, or
    the error it got instead."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    socks: list[socket.socket] = []
    try:
        for _ in range(clients):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            socks.append(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    finally:
        gw.signal(signal.SIGTERM)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    results: list[int | str] = []
    for sock in socks:
        with sock:
            try:
                status, _, _ = RawResponses(sock).next()
                results.append(status)
            except OSError as exc:
                results.append(type(exc).__name__)
    return results


def _status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class RawResponses:
    """Reads HTTP/1.1 responses (Content-Length, chunked or no body) off a raw socket, in order."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(timeout)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def next(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a full head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding") == "chunked":
            return status, headers, self._chunked_body()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            if not self._fill():
                break
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def _chunked_body(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill():
                    raise ConnectionError(f"closed inside a chunked body: {self.buf!r}")
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line, 16)
            while len(self.buf) < size + 2:
                if not self._fill():
                    raise ConnectionError("closed inside a chunk")
            body += self.buf[:size]
            self.buf = self.buf[size + 2 :]
            if size == 0:
                return body

    def closed(self) -> bool:
        """Whether the peer closed (EOF or reset) with nothing more to read."""
        try:
            return not self.buf and not self._fill()
        except ConnectionResetError:
            return True


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    return RawResponses(sock, timeout).next()


class BackgroundGet:
    """A GET through the gateway in a thread, for shutdown tests: its status
    and the chunks of `/slow/...` it received, or the error it ended with."""

    def __init__(self, gw: GatewayProcess, url: str) -> None:
        self.result: dict[str, object] = {}
        self.started = threading.Event()  # the response head has arrived: the download is under way
        self._thread = threading.Thread(target=self._get, args=(gw.proxy, url))
        self._thread.start()

    def _get(self, proxy: str, url: str) -> None:
        try:
            with requests.get(url, proxies={"http": proxy}, timeout=30, stream=True) as r:
                self.started.set()
                self.result["status"] = r.status_code
                self.result["chunks"] = r.content.decode().count("chunk")
        except Exception as exc:  # reported by the caller's assertions
            self.result["error"] = exc
        finally:
            self.started.set()

    def wait_started(self, timeout: float = 10) -> None:
        assert self.started.wait(timeout), "the download never started"

    def join(self, timeout: float = 30) -> dict[str, object]:
        self._thread.join(timeout)
        return self.result
