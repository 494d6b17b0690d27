"""Which serving process the kernel gives new connections to (`--workers N`).

The processes listen on one port with SO_REUSEPORT, and the kernel picks a
listener for each new connection by a hash of its addresses: half of a
light load goes to each of two processes. Handing such connections to
process 0 afterwards (`inference/handoff.py`) costs both processes a system
call or three per connection, and the split itself costs more: two
processes that share a load one could carry each wake once per connection,
and on a box they share with the clients and origins every connection then
costs about a third more CPU (bench/RESULTS.md).

So process 0 tells the kernel where to send new connections while it has
room: a classic BPF program attached to the port's listener group
(SO_ATTACH_REUSEPORT_CBPF) returns the index of the listener to use, in
the order the listeners started listening. The supervisor opens them in
process order, so index 0 is process 0's; a program that returns an index
out of range leaves the choice to the hash again. Attaching needs no
privilege; where it fails (not Linux, a filter refused), steering stays off
and the handoff at accept does the same job more dearly.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct

log = logging.getLogger("proxygate.steering")

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>; the socket module does not name it

_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant


class _Program:
    """A one-instruction classic BPF program, `return k`, as setsockopt takes it (struct sock_fprog)."""

    def __init__(self, k: int) -> None:
        # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k;}, kept alive with this object:
        # the kernel copies it at setsockopt, through the pointer in sock_fprog.
        self._filter = ctypes.create_string_buffer(struct.pack("=HBBI", _BPF_RET_K, 0, 0, k), 8)
        self.fprog = struct.pack("@HP", 1, ctypes.addressof(self._filter))


_TO_FIRST = _Program(0)
_BY_HASH = _Program(0xFFFFFFFF)  # no such index: the kernel's hash decides


class ConnectionSteering:
    """Steers the listener group of `listeners` (one socket per address family, the first process's)."""

    def __init__(self, listeners: list[socket.socket]) -> None:
        self.listeners = listeners
        self.to_first = False  # new connections all go to the group's first listener
        self.available = hasattr(socket, "SO_REUSEPORT")

    def steer_to_first(self, on: bool) -> None:
        """All new connections to the first listener (`on`), or by the kernel's hash."""
        if on == self.to_first or not self.available:
            return
        try:
            self._attach(_TO_FIRST if on else _BY_HASH)
        except OSError as exc:
            log.info("cannot steer new connections to one process (%s); moving them instead", exc)
            self.available = False
            self.release()
            return
        self.to_first = on

    def release(self) -> None:
        """Leave every new connection to the kernel's hash, whatever this object last did
        (the supervisor, when process 0 is gone: its successor decides again)."""
        try:
            self._attach(_BY_HASH)
        except OSError:
            pass  # the socket takes no filter (closed, or no such option): nothing steers through it
        self.to_first = False

    def _attach(self, program: _Program) -> None:
        for sock in self.listeners:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program.fprog)
