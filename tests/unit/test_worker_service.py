"""The worker's gRPC handler counts a generation as cancelled only when it was cut short.

grpc closes the handler's generator when the caller cancels its call; a
caller that does so once it holds the last message (or whose cancel races
the end of the call) cancelled nothing. Driven directly, as grpc drives it.
"""

from __future__ import annotations

import asyncio

from proxygate._pb import inference_pb2
from proxygate.worker.engines.echo import EchoEngine
from proxygate.worker.server import ModelService


def closed_after(messages: int) -> tuple[list[inference_pb2.TokenResponse], ModelService]:
    """Read `messages` responses of a 3-token generation, then close the handler as grpc does."""
    service = ModelService(EchoEngine())

    async def main() -> list[inference_pb2.TokenResponse]:
        request = inference_pb2.GenerateRequest(request_id="r", model="m", prompt="a b", max_tokens=3)
        handler = service.Generate(request, None)  # type: ignore[arg-type]  # the echo path needs no context
        got = [await handler.__anext__() for _ in range(messages)]
        await handler.aclose()
        return got

    return asyncio.run(main()), service


def test_closed_after_the_last_message_is_not_a_cancel() -> None:
    got, service = closed_after(4)  # 3 tokens, then the finished message
    assert got[-1].finished and service.started == 1 and service.cancelled == 0 and service.calls == 0


def test_closed_mid_stream_is_a_cancel() -> None:
    got, service = closed_after(2)
    assert not got[-1].finished and service.cancelled == 1 and service.calls == 0
