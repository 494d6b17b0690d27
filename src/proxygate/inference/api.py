"""`POST /v1/inference`: the seed's JSON-in, server-sent-events-out API.

Validation errors are 400 naming the field; the stream's head is sent only
with the first token, so queueing and worker failures before it still get a
proper status (503, 404, 502, 504). After it, a failure is an `event: error`
with one line of data, and the stream ends.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest, PayloadTooLarge
from ..http.message import Request
from .service import DEFAULT_MODEL, GenerationFailed, GenerationRequest, InferenceService
from .sse import SseWriter

if TYPE_CHECKING:
    from ..http.connection import ClientConnection

MAX_BODY = 1024 * 1024


async def read_json_body(req: Request, limit: int = MAX_BODY) -> Any:
    if req.body is None:
        raise BadRequest("request body must be a JSON object")
    if req.content_length is not None and req.content_length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while chunk := await req.body.read():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        parts.append(chunk)
    try:
        return json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def parse_generation(
    body: Any, request_id: str, *, max_tokens_limit: int, max_prompt_bytes: int, header_priority: bytes | None
) -> GenerationRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt is required and must be a non-empty string")
    if len(prompt.encode()) > max_prompt_bytes:
        raise BadRequest(f"prompt must be at most {max_prompt_bytes} bytes")
    model = body.get("model") or DEFAULT_MODEL
    if not isinstance(model, str) or len(model) > 256:
        raise BadRequest("model must be a string")
    if "priority" not in body and header_priority is not None:
        try:
            body = {**body, "priority": int(header_priority)}
        except ValueError:
            raise BadRequest("X-Priority must be an integer") from None
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 8 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of up to 8 non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer")
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        model=model,
        max_tokens=_integer(body, "max_tokens", min(100, max_tokens_limit), 1, max_tokens_limit),
        temperature=_number(body, "temperature", 0.7, 0.0, 2.0),
        priority=_integer(body, "priority", 1, 1, 10),
        stop=stop,
        top_p=_number(body, "top_p", 0.0, 0.0, 1.0),
        seed=seed,
    )


class SeedInferenceApi:
    def __init__(self, service: InferenceService, max_tokens_limit: int, max_prompt_bytes: int) -> None:
        self.service = service
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_bytes = max_prompt_bytes

    async def handle(self, req: Request, conn: ClientConnection) -> None:
        body = await read_json_body(req)
        req.abort_on_client_eof = True
        gen = parse_generation(
            body,
            req.request_id,
            max_tokens_limit=self.max_tokens_limit,
            max_prompt_bytes=self.max_prompt_bytes,
            header_priority=req.header(b"x-priority"),
        )
        sse = SseWriter(conn, req)
        stream = self.service.stream(gen)  # an async generator: closed below whatever happens
        try:
            async for resp in stream:
                event: dict[str, Any] = {"request_id": gen.request_id}
                if resp.token:
                    event["token"] = resp.token
                if resp.finished:
                    event["finished"] = True
                if resp.token_count:
                    event["token_count"] = resp.token_count
                await sse.send(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
        except GenerationFailed as exc:
            await sse.error(str(exc))
        finally:
            await stream.aclose()
        sse.end()
