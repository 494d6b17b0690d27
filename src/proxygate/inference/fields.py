"""Request-body fields shared by the inference APIs: JSON reading and bounded values.

Every error is a 400 that names the field, as the seed API and OpenAI clients expect.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from ..errors import BadRequest, PayloadTooLarge, RequestTimeout
from ..http.message import Request
from .service import DEFAULT_MODEL, GenerationRequest, routing_head

MAX_BODY = 1024 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


async def read_json_body(req: Request, limit: int = MAX_BODY, within: float = 30.0) -> Any:
    """The parsed JSON body, read whole within `within` seconds (408 after:
    a body sent a byte every few seconds must not hold a connection forever)."""
    if req.body is None:
        raise BadRequest("request body must be a JSON object")
    if req.content_length is not None and req.content_length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    parts: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within if within else None
    while True:
        try:
            chunk = await req.body.read(None if deadline is None else max(0.001, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"request body not received within {within:g}s") from None
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        parts.append(chunk)
    data = b"".join(parts)
    try:
        # Decoded here, strictly: json.loads(bytes) would let UTF-8-encoded
        # surrogates (ED A0 80) through as lone surrogates ("surrogatepass").
        body = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"invalid JSON: {str(exc)[:200]}") from None
    if data.find(b"\\u") >= 0:  # not `in`: CPython's bytes `in` makes and drops a TypeError first
        # JSON may spell a lone UTF-16 surrogate (\ud800): Python keeps it,
        # and it would fail later when encoded for a worker or a log line.
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("invalid JSON: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
    return body


def number_field(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def integer_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
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


def prompt_field(value: Any, name: str, max_bytes: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{name} is required and must be a non-empty string")
    if len(value.encode()) > max_bytes:
        raise BadRequest(f"{name} must be at most {max_bytes} bytes")
    return value


def common_options(
    body: dict[str, Any],
    *,
    max_tokens_limit: int,
    default_max_tokens: int,
    default_temperature: float,
    header_priority: bytes | None,
) -> dict[str, Any]:
    """model, max_tokens, temperature, priority, stop, top_p and seed, validated."""
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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not INT64_MIN <= seed <= INT64_MAX):
        raise BadRequest("seed must be an integer that fits in 64 bits")
    return {
        "model": model,
        "max_tokens": integer_field(body, "max_tokens", min(default_max_tokens, max_tokens_limit), 1, max_tokens_limit),
        "temperature": number_field(body, "temperature", default_temperature, 0.0, 2.0),
        "priority": integer_field(body, "priority", 1, 1, 10),
        "stop": stop,
        "top_p": number_field(body, "top_p", 0.0, 0.0, 1.0),
        "seed": seed,
    }


def announce_route(req: Request, gen: GenerationRequest) -> None:
    """Once the serving model is known: response headers and access-log fields say how `gen` was routed."""
    req.extra_head += routing_head(gen)
    req.log_fields = (("route", gen.route), ("model", gen.served_model))
