"""SSE framing: a streamed token's event, rendered from a template, equals rendering it whole."""

from __future__ import annotations

from typing import Any

from proxygate.inference.sse import SLOT, compact_json, encode_event, token_events

TOKENS = ["Hello", ' wor"ld\\', "line\nbreak", "\u00e9\u4e2d\U0001f600", "", "\u2028", "</script>", SLOT]


def chunk(model: str) -> Any:
    def make(text: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }

    return make


def test_a_token_event_is_the_same_bytes_as_rendering_the_whole_object() -> None:
    for model in ("small", 'we"ird\u00e9', SLOT):  # the last one cannot use the template
        make = chunk(model)
        render = token_events(make)
        for token in TOKENS:
            assert render(token) == encode_event(compact_json(make(token))), (model, token)


def test_an_event_stays_on_one_line() -> None:
    event = token_events(chunk("m"))("a\nb\r\nc")
    assert event.endswith(b"\n\n") and event.count(b"\n") == 2
