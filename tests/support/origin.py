"""A real origin server for tests: threaded, HTTP/1.1, plain or TLS, on 127.0.0.1:0.

Paths:
  /hello                 "hello" with Content-Length
  /bytes/N               N bytes (Content-Length), streamed in 64 KiB writes
  /chunked/N             N bytes, chunked transfer encoding
  /close/N               N bytes, no length: ends when the connection closes
  /slow/N/SECONDS        N chunks spread over SECONDS, chunked
  /status/N              that status (no body for 1xx/204/304)
  /headers               the request headers as JSON
  /conn[/SECONDS]        the client port of this connection (pooling checks), after SECONDS
  /metrics               a body saying it is the origin's
  POST|PUT /echo         sha256 and length of the request body as JSON
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATTERN = bytes(range(256)) * 256  # 64 KiB of known bytes


def pattern_bytes(n: int) -> bytes:
    reps, rest = divmod(n, len(PATTERN))
    return PATTERN * reps + PATTERN[:rest]


class OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "origin/1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _stream_length(self, n: int) -> None:
        sent = 0
        while sent < n:
            piece = min(len(PATTERN), n - sent)
            self.wfile.write(PATTERN[:piece])
            sent += piece

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        name = parts[0]
        if name == "hello":
            self._send(
                200, b"hello", extra={"Connection": "keep-alive, X-Hop", "X-Hop": "secret", "Keep-Alive": "timeout=5"}
            )
        elif name == "bytes":
            n = int(parts[1])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                self._stream_length(n)
        elif name == "chunked":
            n = int(parts[1])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command == "HEAD":
                return
            data = pattern_bytes(n)
            for i in range(0, n, 10000):
                piece = data[i : i + 10000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif name == "close":
            n = int(parts[1])
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self._stream_length(n)
            self.close_connection = True
        elif name == "slow":
            chunks, seconds = int(parts[1]), float(parts[2])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(chunks):
                piece = b"chunk %d\n" % i
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
                time.sleep(seconds / chunks)
            self.wfile.write(b"0\r\n\r\n")
        elif name == "status":
            code = int(parts[1])
            self.send_response(code)
            if code in (204, 304) or code < 200:
                self.end_headers()
            else:
                self.send_header("Content-Length", "2")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(b"ok")
        elif name == "headers":
            body = json.dumps([[k, v] for k, v in self.headers.items()]).encode()
            self._send(200, body, "application/json")
        elif name == "conn":
            if len(parts) > 1:
                time.sleep(float(parts[1]))
            self._send(200, str(self.client_address[1]).encode())
        elif name == "metrics":
            self._send(200, b"origin metrics\n")
        else:
            self._send(404, b"not found")

    def _read_body(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        total = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionResetError("the body ended early")  # the sender gave up: not our error
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    piece = self.rfile.read(min(left, 1 << 16))
                    if not piece:
                        raise ConnectionResetError("the body ended early")
                    digest.update(piece)
                    left -= len(piece)
                    total += len(piece)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                piece = self.rfile.read(min(left, 1 << 16))
                if not piece:
                    break
                digest.update(piece)
                left -= len(piece)
                total += len(piece)
        return total, digest.hexdigest()

    def do_POST(self) -> None:
        total, digest = self._read_body()
        self._send(200, json.dumps({"length": total, "sha256": digest}).encode(), "application/json")

    do_PUT = do_POST


class _QuietServer(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's default backlog of 5 refuses connections under load

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients (and the gateway) hang up mid-response on purpose in tests.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class Origin:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.server = _QuietServer(("127.0.0.1", 0), OriginHandler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class EchoTcpServer:
    """Raw TCP: echoes everything back and half-closes when the client does."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)

    def __enter__(self) -> EchoTcpServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
