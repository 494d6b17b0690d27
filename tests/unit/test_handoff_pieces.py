"""The pieces of moving a connection between processes, without a gateway: the
shared owner load, and a sender passing a socket at once to a real receiver."""

from __future__ import annotations

import asyncio
import io
import os
import socket

from proxygate.config import GatewaySettings
from proxygate.gateway import Gateway
from proxygate.inference.handoff import HandoffReceiver, HandoffSender, OwnerLoad
from proxygate.observability.logging import AccessLog
from proxygate.wiring import build_gateway


def test_owner_load_is_shared_across_fork() -> None:
    load = OwnerLoad(2)
    assert load.connections == 0
    pid = os.fork()
    if pid == 0:  # the owner, in another process
        load.publish(3)
        os._exit(0)
    os.waitpid(pid, 0)
    assert load.connections > 0
    load.publish(0)
    assert load.connections == 0


def test_owner_load_counts_connections_on_their_way() -> None:
    """Passed by a sibling, the connection counts at once; adopted, it counts as the owner's."""
    load = OwnerLoad(3)
    pid = os.fork()
    if pid == 0:  # process 2 passes two connections
        load.index = 2
        load.passed()
        load.passed()
        os._exit(0)
    os.waitpid(pid, 0)
    assert load.connections == 2
    load.publish(1)  # the owner adopts the first
    load.adopted()
    assert load.connections == 2
    load.publish(2)
    load.adopted()
    assert load.connections == 2
    load.publish(0)  # both closed
    assert load.connections == 0
    load.index = 1
    load.passed()  # on its way to an owner that dies before adopting it
    assert load.connections > 0
    load.restart()  # its successor
    assert load.connections == 0


def test_send_now_passes_a_socket_once_connected(tmp_path) -> None:
    async def main() -> None:
        adopted: asyncio.Queue[tuple[socket.socket, bytes]] = asyncio.Queue()

        async def adopt(sock: socket.socket, preface: bytes) -> None:
            await adopted.put((sock, preface))

        path = str(tmp_path / "handoff.sock")
        receiver = HandoffReceiver(path, adopt)
        receiver.start()
        sender = HandoffSender(path)
        ours, theirs = socket.socketpair()
        try:
            assert not sender.send_now(ours.fileno())  # not connected yet: it connects in the background
            for _ in range(200):
                if sender.send_now(ours.fileno()):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the sender never connected")
            moved, preface = await asyncio.wait_for(adopted.get(), 5)
            assert preface == b""
            ours.close()  # the sender's copy goes; the moved one still reaches the peer
            with moved:
                moved.sendall(b"ping")
                assert theirs.recv(4) == b"ping"
        finally:
            sender.close()
            receiver.close()
            theirs.close()

    asyncio.run(main())


def test_sockets_sent_before_the_receiver_closes_are_still_adopted(tmp_path) -> None:
    """Process 0 stopping closes its handoff streams; sockets a sibling has already sent on
    them, not read yet, are adopted (and answered) instead of closed with the stream."""

    async def main() -> None:
        adopted: list[bytes] = []

        async def adopt(sock: socket.socket, preface: bytes) -> None:
            adopted.append(preface)
            sock.close()

        path = str(tmp_path / "handoff.sock")
        receiver = HandoffReceiver(path, adopt)
        receiver.start()
        sender = HandoffSender(path)
        pairs = [socket.socketpair() for _ in range(4)]
        try:
            for _ in range(200):  # connected, and the receiver has taken the stream
                if sender.send_now(pairs[0][0].fileno()):
                    break
                await asyncio.sleep(0.01)
            for _ in range(200):
                if adopted:
                    break
                await asyncio.sleep(0.01)
            assert adopted == [b""], "the first socket never arrived"
            for ours, _ in pairs[1:]:
                assert sender.send_now(ours.fileno())
            receiver.close()  # before the loop has read them
            for _ in range(20):
                await asyncio.sleep(0)
            assert len(adopted) == 4
        finally:
            sender.close()
            for a, b in pairs:
                a.close()
                b.close()

    asyncio.run(main())


class _Accepted:
    """What `Gateway.moved_at_accept` uses of a new client connection: its socket, and being let go."""

    def __init__(self, gateway: Gateway, sock: socket.socket) -> None:
        self.gateway = gateway
        self.transport = self
        self.sock = sock
        self.moved = False

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def handed_over(self) -> None:
        self.moved = True
        self.gateway.connection_closed(self)  # type: ignore[arg-type]


def test_a_move_at_accept_is_counted_before_the_owner_counts_it(tmp_path) -> None:
    """A burst of new connections moves to an owner with room until it holds `--spread-above`
    of them, though the owner has adopted none yet (else the whole burst would move)."""

    async def main() -> None:
        async def adopt(sock: socket.socket, preface: bytes) -> None:
            sock.close()  # adopted and gone at once: the owner's open count stays 0
            load.adopted()

        receiver = HandoffReceiver(str(tmp_path / "handoff.sock"), adopt)
        receiver.start()
        load = OwnerLoad(2)
        load.index = 1  # the gateway below is the second process
        settings = GatewaySettings(blocklist=str(tmp_path / "none.json"), spread_above=2)
        gateway = build_gateway(
            settings,
            access_log=AccessLog("json", stream=io.StringIO()),
            owner_load=load,
            inference_relay=str(tmp_path / "relay.sock"),
        )
        handoff = gateway.parts.handoff
        assert handoff is not None
        pairs = [socket.socketpair() for _ in range(4)]
        try:
            for _ in range(200):  # the sender connects in the background on its first try
                if handoff.send_now(pairs[0][0].fileno()):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the sender never connected")
            for _ in range(200):  # that first connection reaches the owner: idle again
                if load.connections == 0:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the first connection was never adopted")
            # No await below: nothing passed now can be adopted before the next is accepted.
            accepted = [_Accepted(gateway, ours) for ours, _ in pairs[1:]]
            verdicts = []
            for conn in accepted:
                gateway.connection_opened(conn)  # type: ignore[arg-type]
                verdicts.append(gateway.moved_at_accept(conn))  # type: ignore[arg-type]
            assert verdicts == [True, True, False]
            assert load.connections == 2
        finally:
            handoff.close()
            receiver.close()
            for ours, theirs in pairs:
                ours.close()
                theirs.close()

    asyncio.run(main())


def test_at_accept_the_owner_has_room_below_spread_above_and_while_not_busy() -> None:
    load = OwnerLoad(2)
    load.publish(10)
    assert load.room_at_accept(32) and not load.room_at_accept(10)
    load.publish_busy(0.3)  # a load of short connections keeps the count low, not the busy share
    assert not load.room_at_accept(32) and load.has_room(32)
    assert not OwnerLoad(2).room_at_accept(0), "--spread-above 0: the kernel's spread"


def test_the_owner_has_room_below_spread_above_or_while_not_busy() -> None:
    load = OwnerLoad(2)
    load.publish(10)
    load.publish_busy(0.95)
    assert load.has_room(32) and not load.has_room(10)  # by the count
    load.publish_busy(0.3)
    assert load.has_room(10)  # beyond the count, while it uses under half a core
    assert not load.overloaded(40, 32)
    load.publish_busy(0.9)
    assert load.overloaded(40, 32) and not load.overloaded(32, 32)  # only beyond what it gathers
    load.publish_busy(0.7)
    assert not load.has_room(10) and not load.overloaded(40, 32), "between the two, nothing moves"


def test_a_saturated_owner_ends_one_connection_at_a_time(tmp_path) -> None:
    """`Connection: close` on one response every SHED_EVERY seconds, and only while it is
    saturated with more connections than it gathers."""
    from proxygate.gateway import SHED_EVERY

    class Clock:
        now = 100.0

        def time(self) -> float:
            return self.now

    class Conn:
        loop = Clock()

    class Ex:
        conn = Conn()

    load = OwnerLoad(2)
    gateway = build_gateway(
        GatewaySettings(blocklist=str(tmp_path / "none.json"), spread_above=2),
        access_log=AccessLog("json", stream=io.StringIO()),
        owner_load=load,
    )
    ex = Ex()
    gateway.connections.update({object(), object(), object()})  # type: ignore[arg-type]
    load.publish_busy(0.5)
    assert not gateway._sheds(ex)  # type: ignore[arg-type]
    load.publish_busy(0.95)
    assert gateway._sheds(ex)  # type: ignore[arg-type]
    assert not gateway._sheds(ex)  # type: ignore[arg-type]
    Conn.loop.now += SHED_EVERY
    assert gateway._sheds(ex)  # type: ignore[arg-type]
    gateway.connections.pop()
    Conn.loop.now += SHED_EVERY
    assert not gateway._sheds(ex), "no more than --spread-above left"  # type: ignore[arg-type]
    assert gateway.connection_stats.shed == 2


def test_the_owner_keeps_new_connections_below_spread_above_and_with_a_margin_once_spread() -> None:
    load = OwnerLoad(2)
    assert load.keeps_new_connections(True, 10, 32, 0.5), "steered, it keeps them until 80 % of a core"
    assert not load.keeps_new_connections(False, 10, 32, 0.5), "spread, it takes them back only below 40 % (80 % / 2)"
    assert load.keeps_new_connections(False, 10, 32, 0.35)
    assert not load.keeps_new_connections(True, 32, 32, 0.0), "never at --spread-above connections"
    assert not load.keeps_new_connections(True, 10, 32, 0.85)
    assert not OwnerLoad(2).keeps_new_connections(True, 0, 0, 0.0), "--spread-above 0: the kernel's spread"
