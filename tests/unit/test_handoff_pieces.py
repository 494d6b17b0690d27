"""The pieces of moving a connection between processes, without a gateway: the
shared owner load, and a sender passing a socket at once to a real receiver."""

from __future__ import annotations

import asyncio
import os
import socket

from proxygate.inference.handoff import HandoffReceiver, HandoffSender, OwnerLoad


def test_owner_load_is_shared_across_fork() -> None:
    load = OwnerLoad()
    assert load.idle
    pid = os.fork()
    if pid == 0:  # the owner, in another process
        load.publish(3)
        os._exit(0)
    os.waitpid(pid, 0)
    assert not load.idle
    load.publish(0)
    assert load.idle


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
