"""Shared pieces of the stress probes: processes, raw requests, resource sampling, the report.

The gateway and worker processes are the test suite's own helpers
(tests/support), so a probe starts them exactly as the tests do: loopback
only, ephemeral ports, logs in a work folder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.gateway import GatewayProcess
from tests.support.worker import WorkerProcess

__all__ = ["GatewayProcess", "WorkerProcess", "Report", "exchange", "status_of", "tree_pids", "rss_kib", "fd_count"]


def accept_forever(sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept on a listening socket in a thread, each connection handled in a thread of its own,
    until the socket is closed."""

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def exchange(port: int, data: bytes, *, timeout: float = 3.0, half_close: bool = True) -> bytes:
    """Send `data` on a new connection, then read until the gateway closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway may close before taking everything: its answer is still read
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    """The first response's status code (0: no HTTP answer)."""
    if answer.startswith(b"HTTP/1.") and len(answer) >= 12 and answer[9:12].isdigit():
        return int(answer[9:12])
    return 0


def statuses(answer: bytes) -> list[int]:
    """Every response status line in a byte stream (pipelined answers)."""
    out = []
    pos = 0
    while (pos := answer.find(b"HTTP/1.", pos)) != -1:
        code = answer[pos + 9 : pos + 12]
        if code.isdigit():
            out.append(int(code))
        pos += 12
    return out


def tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants (a gateway with --workers N is N+1 processes)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
        except OSError:
            children = []
        pids.extend(int(c) for c in children)
        i += 1
    return pids


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def access_lines(gw: GatewayProcess) -> list[dict]:
    """The gateway's access-log entries so far (JSON lines with msg "request")."""
    out = []
    for line in gw.log().splitlines():
        if line.startswith("{") and '"msg":"request"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@dataclass
class Report:
    """Each probe's rows: a name, whether it passed, and what was measured."""

    rows: list[tuple[str, bool, str]] = field(default_factory=list)
    details: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    def detail(self, title: str, lines: list[str]) -> None:
        """Per-case lines under a probe (printed now, listed after the table)."""
        self.details[title] = lines
        for line in lines:
            print(f"      {line}", flush=True)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.rows)

    def markdown(self) -> str:
        lines = ["| probe | result | measured |", "|---|---|---|"]
        lines += [f"| {name} | {'pass' if ok else '**FAIL**'} | {detail} |" for name, ok, detail in self.rows]
        for title, items in self.details.items():
            lines += ["", f"{title}:", ""] + [f"- {item}" for item in items]
        return "\n".join(lines)
