"""An absolute-form target: parsed once and remembered when of ordinary length, refused every time."""

from __future__ import annotations

import pytest

from proxygate.errors import BadRequest
from proxygate.proxy.forward import parse_target


def test_an_ordinary_target_is_parsed_once_and_remembered() -> None:
    target = parse_target(b"http://Origin.TEST.:8080/a/b?x=1")
    assert (target.host, target.port, target.path, target.authority) == (
        "origin.test",
        8080,
        b"/a/b?x=1",
        b"Origin.TEST.:8080",
    )
    assert parse_target(b"http://Origin.TEST.:8080/a/b?x=1") is target
    v6 = parse_target(b"http://[::1]/")
    assert (v6.host, v6.port, v6.path, v6.authority) == ("::1", 80, b"/", b"[::1]")


def test_a_long_target_is_parsed_each_time_not_remembered() -> None:
    raw = b"http://origin.test/" + b"a" * 2000
    first, second = parse_target(raw), parse_target(raw)
    assert first is not second and first.path == second.path == b"/" + b"a" * 2000


@pytest.mark.parametrize(
    "target, reason",
    [
        (b"https://origin.test/", "use CONNECT"),
        (b"http:///nohost", "malformed|no host"),
        (b"http://h\xc3\xa9.test/", "malformed"),
    ],
)
def test_refused_targets_are_refused_every_time(target: bytes, reason: str) -> None:
    for _ in range(2):  # a refusal is never remembered as an answer
        with pytest.raises(BadRequest, match=reason):
            parse_target(target)
