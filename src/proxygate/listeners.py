"""The gateway's listening sockets, opened by hand so that several processes can share a port.

With `reuse_port` each process has its own socket bound to the same
address (SO_REUSEPORT), and the kernel spreads new connections over them
(or steers them: `steering.py`).
"""

from __future__ import annotations

import socket

BACKLOG = 2048


Address = tuple[int, tuple[object, ...]]  # (family, sockaddr)


def listener_addresses(host: str, port: int) -> list[Address]:
    """(family, sockaddr) for each address `host` (empty: every interface) names."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[Address] = []
    for family, _type, _proto, _name, addr in infos:
        if (family, addr) not in out:
            out.append((family, addr))
    return out


def open_listeners(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for host:port, one per address family.

    With port 0 the first socket picks the port and the others take the same one.
    """
    socks: list[socket.socket] = []
    try:
        for family, addr in listener_addresses(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: no v4-mapped surprises.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def take_queued(socks: list[socket.socket]) -> list[socket.socket]:
    """The connections the kernel has completed on `socks` and nobody has accepted yet.

    Closing a listener resets every connection still in its accept queue:
    taken just before, they can be answered instead (a stop under load
    finds many there, their requests already sent).
    """
    taken: list[socket.socket] = []
    for listener in socks:
        while True:
            try:
                conn, _ = listener.accept()
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError:  # BlockingIOError: the queue is empty (or no descriptor is left)
                break
            conn.setblocking(False)
            taken.append(conn)
    return taken


def listening_url(proto: str, sock: socket.socket) -> str:
    """`http://127.0.0.1:8080`, `http://[::1]:8080`: what the log says we listen on."""
    host, port = sock.getsockname()[:2]
    return f"{proto}://{f'[{host}]' if ':' in host else host}:{port}"
