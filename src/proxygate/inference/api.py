"""`POST /v1/inference`: the seed's JSON-in, server-sent-events-out API.

Validation errors are 400 naming the field; the stream's head is sent only
with the first token, so queueing and worker failures before it still get a
proper status (503, 404, 502, 504). After it, a failure is an `event: error`
with one line of data, and the stream ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import BadRequest
from ..http.message import Request
from .fields import announce_route, common_options, prompt_field, read_json_body
from .service import GenerationFailed, GenerationRequest, InferenceService
from .sse import SseWriter, compact_json
from .tenancy import TenantGate

if TYPE_CHECKING:
    from ..http.exchange import Exchange


def parse_generation(
    body: Any, request_id: str, *, max_tokens_limit: int, max_prompt_bytes: int, header_priority: bytes | None
) -> GenerationRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt_field(body.get("prompt"), "prompt", max_prompt_bytes),
        max_tokens_explicit=body.get("max_tokens") is not None,
        **common_options(
            body,
            max_tokens_limit=max_tokens_limit,
            default_max_tokens=100,
            default_temperature=0.7,
            header_priority=header_priority,
        ),
    )


class SeedInferenceApi:
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

    async def handle(self, req: Request, ex: Exchange) -> None:
        body = await read_json_body(req, within=ex.settings.read_timeout)
        ex.end_on_client_eof()
        gen = parse_generation(
            body,
            req.request_id,
            max_tokens_limit=self.max_tokens_limit,
            max_prompt_bytes=self.max_prompt_bytes,
            header_priority=req.header(b"x-priority"),
        )
        admission = await self.tenants.admit(req, gen)
        sse = SseWriter(ex, req)
        stream = self.service.stream(gen)  # an async generator: closed below whatever happens
        try:
            async for resp in stream:
                admission.observe(resp)
                if not sse.started:
                    announce_route(req, gen)
                event: dict[str, Any] = {"request_id": gen.request_id}
                if resp.token:
                    event["token"] = resp.token
                if resp.finished:
                    event["finished"] = True
                if resp.token_count:
                    event["token_count"] = resp.token_count
                await sse.send(compact_json(event))
        except GenerationFailed as exc:
            req.error = str(exc)
            await sse.error(str(exc))
        finally:
            await stream.aclose()
            admission.finish()
        sse.end()
