"""Request smuggling and framing: does the origin ever see a request the gateway did not?

Each case sends one client connection's bytes through the gateway to an
origin that logs the raw bytes it receives and parses them strictly (CRLF
lines, one framing header, strict chunk sizes). A case passes when

- the origin never sees ambiguous framing (both Content-Length and
  Transfer-Encoding, two Content-Lengths, an obfuscated Transfer-Encoding,
  a bare LF, an invalid chunk), so any parser would read what it reads; and
- every request the origin parsed is one the gateway itself logged (and so
  checked against its policies): a smuggled request hidden in a body either
  stays body bytes, framed unambiguously, or is refused.
"""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.support.gateway import OPEN_POLICY

from .harness import GatewayProcess, Report, accept_forever, access_lines, exchange, statuses, wait_until

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class StrictOrigin:
    """A loopback origin that parses strictly and records every request (path) and every ambiguity."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.seen: list[str] = []  # paths, and "AMBIGUOUS: why"
        self.raw = bytearray()
        self.lock = threading.Lock()
        accept_forever(self.sock, self._serve)

    def _record(self, what: str) -> None:
        with self.lock:
            self.seen.append(what)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)

        def more() -> bytes:
            try:
                data = conn.recv(65536)
            except OSError:
                return b""
            with self.lock:
                self.raw += data
            return data

        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = more()
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                why, path, framing = self._check_head(head)
                if why:
                    self._record(f"AMBIGUOUS: {why}")
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                if framing == "chunked":
                    body_ok, buf = self._chunked(buf, more)
                    if not body_ok:
                        self._record("AMBIGUOUS: invalid chunked body")
                        return
                else:
                    assert isinstance(framing, int)
                    while len(buf) < framing:
                        data = more()
                        if not data:
                            return
                        buf += data
                    buf = buf[framing:]
                self._record(path)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    @staticmethod
    def _check_head(head: bytes) -> tuple[str, str, int | str]:
        lines = head.split(b"\r\n")
        if any(b"\n" in line or b"\r" in line or b"\x00" in line for line in lines):
            return "bare CR/LF or NUL in the head", "", 0
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return f"bad request line {lines[0][:80]!r}", "", 0
        lengths, codings = [], []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                return "obsolete line folding", "", 0
            name, sep, value = line.partition(b":")
            if not sep or not TOKEN.fullmatch(name):
                return f"bad header line {line[:80]!r}", "", 0
            if name.lower() == b"content-length":
                lengths.append(value.strip())
            elif name.lower() == b"transfer-encoding":
                codings.append(value.strip().lower())
        if lengths and codings:
            return "both Content-Length and Transfer-Encoding", "", 0
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return f"Content-Length {lengths!r}", "", 0
        if codings and codings != [b"chunked"]:
            return f"Transfer-Encoding {codings!r}", "", 0
        return "", parts[1].decode("latin-1"), "chunked" if codings else int(lengths[0]) if lengths else 0

    @staticmethod
    def _chunked(buf: bytes, more: Callable[[], bytes]) -> tuple[bool, bytes]:
        """Read one strict chunked body from `buf` (+ `more()`); whether it was valid, and what follows it."""

        def need(predicate: Callable[[bytes], bool]) -> bool:
            nonlocal buf
            while not predicate(buf):
                data = more()
                if not data:
                    return False
                buf += data
            return True

        while True:
            if not need(lambda b: b"\r\n" in b):
                return False, b""
            line, buf = buf.split(b"\r\n", 1)
            size_text = line.split(b";", 1)[0]
            if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", size_text):
                return False, b""
            size = int(size_text, 16)
            if size == 0:
                while True:  # trailer lines, then the blank line
                    if not need(lambda b: b"\r\n" in b):
                        return False, b""
                    line, buf = buf.split(b"\r\n", 1)
                    if not line:
                        return True, buf
            if not need(lambda b, n=size: len(b) >= n + 2) or buf[size : size + 2] != b"\r\n":
                return False, b""
            buf = buf[size + 2 :]

    def close(self) -> None:
        self.sock.close()


def cases(o: bytes) -> list[tuple[str, bytes]]:
    """(name, client bytes); in each, /N-b is the request that must not reach the origin unseen."""
    out: list[tuple[str, bytes]] = []

    def add(name: str, build) -> None:  # type: ignore[no-untyped-def]
        n = len(out)
        a, b = b"/s%d-a" % n, b"/s%d-b" % n
        smuggled = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (b, o)
        out.append((name, build(b"http://" + o + a, smuggled)))

    def post(extra: bytes, body: bytes, version: bytes = b"1.1"):  # type: ignore[no-untyped-def]
        return lambda url, s: b"POST %s HTTP/%s\r\nHost: %s\r\n%s\r\n%s" % (url, version, o, extra, body(s))

    def chunk(s: bytes) -> bytes:
        return b"%x\r\n%s\r\n0\r\n\r\n" % (len(s), s)

    te, cl = b"Transfer-Encoding: chunked\r\n", b"Content-Length: %d\r\n"
    end = b"0\r\n\r\n"
    add("CL.TE: Content-Length and chunked", lambda u, s: post(cl % len(end + s) + te, lambda s: end + s)(u, s))
    add("TE.CL: chunked and a short Content-Length", lambda u, s: post(te + cl % 4, chunk)(u, s))
    for name, header in [
        ("TE.TE: chunked, then another Transfer-Encoding", te + b"Transfer-Encoding: x\r\n"),
        ("space before the colon", b"Transfer-Encoding : chunked\r\n"),
        ("xchunked", b"Transfer-Encoding: xchunked\r\n"),
        ("tab before chunked", b"Transfer-Encoding:\tchunked\r\n"),
        ("obs-fold", b"X-A: b\r\n Transfer-Encoding: chunked\r\n"),
        ("chunked, identity", b"Transfer-Encoding: chunked, identity\r\n"),
        ("identity, then chunked", b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n"),
        ("NUL in a header", b"X-A: a\x00b\r\n" + te),
    ]:
        add(f"{name} (+ Content-Length)", lambda u, s, h=header: post(h + cl % len(end + s), lambda s: end + s)(u, s))
    add("two different Content-Lengths", lambda u, s: post(cl % 0 + cl % len(s), lambda s: s)(u, s))
    add("two equal Content-Lengths", lambda u, s: post(cl % len(s) + cl % len(s), lambda s: s)(u, s))
    add("Content-Length: +N", lambda u, s: post(b"Content-Length: +%d\r\n" % len(s), lambda s: s)(u, s))
    add("Content-Length: N, N", lambda u, s: post(b"Content-Length: %d, %d\r\n" % (len(s), len(s)), lambda s: s)(u, s))
    add("Content-Length in hex", lambda u, s: post(b"Content-Length: 0x%x\r\n" % len(s), lambda s: s)(u, s))
    add(
        "Content-Length with leading zeros", lambda u, s: post(b"Content-Length: 000%d\r\n" % len(s), lambda s: s)(u, s)
    )
    add("chunk extension, then a pipelined request", lambda u, s: post(te, lambda s: b"0;x=y\r\n\r\n" + s)(u, s))
    add("chunk size overflow", lambda u, s: post(te, lambda s: b"fffffffffffffffff1\r\n" + s + b"\r\n0\r\n\r\n")(u, s))
    add("negative chunk size", lambda u, s: post(te, lambda s: b"-1\r\n" + s + b"\r\n0\r\n\r\n")(u, s))
    add("bare LF chunk lines", lambda u, s: post(te, lambda s: b"%x\n%s\n0\n\n" % (len(s), s))(u, s))
    add("chunk data longer than its size", lambda u, s: post(te, lambda s: b"3\r\nabc" + s + b"\r\n0\r\n\r\n")(u, s))
    add("bare LF head", lambda u, s: b"POST %s HTTP/1.1\nHost: %s\n%s\n%s" % (u, o, cl % len(end + s) + te, end + s))
    add("chunked on HTTP/1.0", lambda u, s: post(te + cl % len(end + s), lambda s: end + s, b"1.0")(u, s))
    add("GET with a body", lambda u, s: b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n%s" % (u, o, cl % len(s), s))
    add(
        "Expect: 100-continue with CL.TE",
        lambda u, s: post(b"Expect: 100-continue\r\n" + cl % len(end + s) + te, lambda s: end + s)(u, s),
    )
    add("a request hidden in the trailer", lambda u, s: post(te, lambda s: b"0\r\nX-T: 1\r\n" + s)(u, s))
    add(
        "two honest pipelined requests",
        lambda u, s: post(cl % 2, lambda s: b"hi")(u, s) + b"GET http://%s%s" % (o, s[4:]),
    )
    add("body longer than Content-Length", lambda u, s: post(cl % 2, lambda s: b"hi" + s)(u, s))
    return out


def run_smuggling(work: Path, report: Report) -> None:
    origin = StrictOrigin()
    gw = GatewayProcess([*OPEN_POLICY, "--http-ports", "*"], work / "smuggling-gateway.log")
    passed = 0
    rows = []
    try:
        o = b"127.0.0.1:%d" % origin.port
        for name, data in cases(o):
            before_seen = len(origin.seen)
            before_log = len(access_lines(gw))
            answer = exchange(gw.port, data, timeout=3.0)

            # The access log is flushed every 0.25 s: wait until it accounts for every
            # request the origin parsed (a smuggled one never will: then this gives up).
            def unaccounted(before_log: int = before_log, before_seen: int = before_seen) -> Counter[str]:
                logged = Counter(e["path"] for e in access_lines(gw)[before_log:])
                with origin.lock:
                    seen = origin.seen[before_seen:]
                return Counter(s for s in seen if not s.startswith("AMBIGUOUS")) - logged

            wait_until(lambda: not unaccounted(), 5.0)
            unseen = unaccounted()
            with origin.lock:
                seen = origin.seen[before_seen:]
            ambiguous = [s for s in seen if s.startswith("AMBIGUOUS")]
            ok = not ambiguous and not unseen and gw.proc.poll() is None
            passed += ok
            codes = "+".join(map(str, statuses(answer))) or "closed"
            rows.append(
                f"{name}: gateway answered {codes}, origin saw {len(seen)} request(s)"
                + ("" if ok else f" — FAIL {ambiguous or dict(unseen)}")
            )
        total = len(rows)
        with origin.lock:
            ambiguous_anywhere = sum(s.startswith("AMBIGUOUS") for s in origin.seen)
        report.add(
            "smuggling and framing table",
            passed == total and not ambiguous_anywhere,
            f"{passed}/{total} cases passed; ambiguous framing reaching the origin: {ambiguous_anywhere}",
        )
        report.detail("smuggling cases", rows)
    finally:
        gw.stop()
        origin.close()
