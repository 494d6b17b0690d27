"""Steering new connections to the first listener of a SO_REUSEPORT group, on real sockets."""

from __future__ import annotations

import socket

from proxygate.listeners import open_listeners
from proxygate.steering import ConnectionSteering


def _accepted_by(groups: list[list[socket.socket]], connections: int = 40) -> list[int]:
    """Open `connections` connections to the groups' port; how many each group accepted."""
    port = groups[0][0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(connections)]
    try:
        counts = []
        for socks in groups:
            count = 0
            for sock in socks:
                while True:
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        break
                    conn.close()
                    count += 1
            counts.append(count)
        return counts
    finally:
        for client in clients:
            client.close()


def test_steering_sends_every_new_connection_to_the_first_listener_and_back_to_the_hash() -> None:
    first = open_listeners("127.0.0.1", 0, reuse_port=True)
    second = open_listeners("127.0.0.1", first[0].getsockname()[1], reuse_port=True)
    groups = [first, second]
    try:
        steering = ConnectionSteering(first)
        assert steering.available
        assert min(_accepted_by(groups)) > 0, "unsteered, the kernel's hash gives each some"
        steering.steer_to_first(True)
        assert steering.to_first
        assert _accepted_by(groups) == [40, 0]
        steering.steer_to_first(False)
        assert not steering.to_first and min(_accepted_by(groups)) > 0
        steering.steer_to_first(True)
        # Another holder of the first listeners (the supervisor, when process 0 died) undoes it.
        ConnectionSteering(first).release()
        assert min(_accepted_by(groups)) > 0
    finally:
        for sock in first + second:
            sock.close()


def test_releasing_a_group_never_steered_is_harmless() -> None:
    first = open_listeners("127.0.0.1", 0, reuse_port=True)
    try:
        ConnectionSteering(first).release()
        assert _accepted_by([first], 5) == [5]
    finally:
        for sock in first:
            sock.close()
