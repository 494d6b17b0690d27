"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Streaming and not, with `usage`, errors in OpenAI's JSON shape, so the
official `openai` SDK works unchanged. A gateway priority rides along as an
extra body field (`priority`) or the `X-Priority` header.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest, HttpError
from ..http.message import Request
from .fields import announce_route, common_options, prompt_field, read_json_body
from .service import GenerationFailed, GenerationRequest, InferenceService
from .sse import SseWriter, compact_json, token_events
from .tenancy import TenantGate

if TYPE_CHECKING:
    from ..http.exchange import Exchange

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


def _token_choice(chat: bool, text: str) -> dict[str, Any]:
    """A streamed token's choice."""
    if chat:
        return {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": None}


def error_body(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


@dataclass(slots=True)
class _Outcome:
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "stop"

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class OpenAiApi:
    def __init__(
        self,
        service: InferenceService,
        max_tokens_limit: int,
        max_prompt_bytes: int,
        tenants: TenantGate,
    ) -> None:
        self.service = service
        self.tenants = tenants
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_bytes = max_prompt_bytes

    # ---- routes ----------------------------------------------------------------

    async def models(self, req: Request, ex: Exchange) -> None:
        names = self.service.served_names()
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "proxygate"} for n in names]
        ex.send(200, [(b"Content-Type", b"application/json")], compact_json({"object": "list", "data": data}).encode())

    async def completions(self, req: Request, ex: Exchange) -> None:
        await self._guarded(req, ex, chat=False)

    async def chat_completions(self, req: Request, ex: Exchange) -> None:
        await self._guarded(req, ex, chat=True)

    async def _guarded(self, req: Request, ex: Exchange, *, chat: bool) -> None:
        try:
            await self._generate(req, ex, chat=chat)
        except HttpError as exc:
            if ex.response_started:
                raise
            req.error = exc.reason
            headers = [(b"Content-Type", b"application/json"), *exc.headers]
            ex.send(exc.status, headers, error_body(exc.status, exc.reason))

    # ---- request parsing ----------------------------------------------------------

    def _parse(self, body: Any, req: Request, chat: bool) -> tuple[GenerationRequest, bool]:
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        if body.get("n", 1) != 1:
            raise BadRequest("n must be 1")
        options = common_options(
            body,
            max_tokens_limit=self.max_tokens_limit,
            default_max_tokens=self.max_tokens_limit if chat else 16,
            default_temperature=1.0,
            header_priority=req.header(b"x-priority"),
        )
        if chat and "max_tokens" not in body and "max_completion_tokens" in body:
            options["max_tokens"] = common_options(
                {"max_tokens": body["max_completion_tokens"]},
                max_tokens_limit=self.max_tokens_limit,
                default_max_tokens=self.max_tokens_limit,
                default_temperature=1.0,
                header_priority=None,
            )["max_tokens"]
        options["max_tokens_explicit"] = body.get("max_tokens") is not None or (
            chat and body.get("max_completion_tokens") is not None
        )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be a boolean")
        if chat:
            gen = GenerationRequest(request_id=req.request_id, prompt="", messages=self._messages(body), **options)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            gen = GenerationRequest(
                request_id=req.request_id,
                prompt=prompt_field(prompt, "prompt", self.max_prompt_bytes),
                raw_prompt=True,
                **options,
            )
        return gen, stream

    def _messages(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages is required and must be a non-empty list")
        out: list[tuple[str, str]] = []
        size = 0
        for m in messages:
            role = m.get("role") if isinstance(m, dict) else None
            if not isinstance(role, str) or role not in ROLES:
                raise BadRequest("each message needs a role (system, user, assistant, tool or developer)")
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                if not all(isinstance(t, str) for t in texts):
                    raise BadRequest("a text content part needs a string text")
                content = "".join(texts)  # type: ignore[arg-type]
            if not isinstance(content, str):
                raise BadRequest("message content must be a string or a list of text parts")
            size += len(content.encode())
            out.append((role, content))
        if size > self.max_prompt_bytes:
            raise BadRequest(f"messages must be at most {self.max_prompt_bytes} bytes in all")
        return out

    # ---- generation ----------------------------------------------------------------

    async def _generate(self, req: Request, ex: Exchange, *, chat: bool) -> None:
        body = await read_json_body(req, within=ex.settings.read_timeout)
        gen, stream = self._parse(body, req, chat)
        admission = await self.tenants.admit(req, gen)
        ex.end_on_client_eof()
        ident = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        created = int(time.time())
        base = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": gen.model,
        }
        outcome = _Outcome()
        sse = SseWriter(ex, req) if stream else None
        tokens = self.service.stream(gen)
        token_event: Callable[[str], bytes] | None = None  # made once the served model is known
        routed = False
        try:
            async for resp in tokens:
                admission.observe(resp)
                if not routed:
                    routed = True
                    announce_route(req, gen)
                    base["model"] = gen.served_model
                if resp.prompt_tokens:
                    outcome.prompt_tokens = resp.prompt_tokens
                    outcome.cached_tokens = resp.cached_tokens
                if resp.finished:
                    outcome.completion_tokens = resp.token_count or outcome.completion_tokens
                    outcome.finish_reason = resp.finish_reason or "stop"
                if resp.token:
                    outcome.completion_tokens = resp.token_count or outcome.completion_tokens + 1
                    outcome.text.append(resp.token)
                    if sse is not None:
                        if chat and len(outcome.text) == 1:
                            await sse.send(
                                compact_json(
                                    {
                                        **base,
                                        "choices": [
                                            {
                                                "index": 0,
                                                "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None,
                                            }
                                        ],
                                    }
                                )
                            )
                        if token_event is None:
                            token_event = token_events(lambda text: {**base, "choices": [_token_choice(chat, text)]})
                        await sse.send_raw(token_event(resp.token))
        except GenerationFailed as exc:
            if sse is None:
                raise HttpError(f"generation failed: {exc}") from None
            req.error = str(exc)
            await sse.send(
                compact_json({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
            )
            await sse.send_raw(b"data: [DONE]\n\n")
            sse.end()
            return
        finally:
            await tokens.aclose()
            admission.finish()
        if sse is not None:
            last = (
                {"index": 0, "delta": {}, "finish_reason": outcome.finish_reason}
                if chat
                else {"index": 0, "text": "", "logprobs": None, "finish_reason": outcome.finish_reason}
            )
            await sse.send(compact_json({**base, "choices": [last], "usage": outcome.usage()}))
            await sse.send_raw(b"data: [DONE]\n\n")
            sse.end()
            return
        text = "".join(outcome.text)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": outcome.finish_reason,
                "logprobs": None,
            }
            obj = {**base, "object": "chat.completion", "choices": [choice], "usage": outcome.usage()}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
            obj = {**base, "choices": [choice], "usage": outcome.usage()}
        ex.send(200, [(b"Content-Type", b"application/json")], compact_json(obj).encode())
