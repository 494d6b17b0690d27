"""The CONNECT target (`host:port`, `[v6]:port`): parsed once and remembered, refused every time."""

from __future__ import annotations

import pytest

from proxygate.errors import BadRequest
from proxygate.proxy.connect import parse_authority


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"Origin.TEST:443", ("origin.test", 443)),
        (b"origin.test.:8443", ("origin.test", 8443)),
        (b"127.0.0.1:1", ("127.0.0.1", 1)),
        (b"[::1]:65535", ("::1", 65535)),
        (b"[FE80::1%eth0]:22", ("fe80::1%eth0", 22)),
    ],
)
def test_accepted_targets(target: bytes, expected: tuple[str, int]) -> None:
    assert parse_authority(target) == expected
    assert parse_authority(target) is parse_authority(target)  # remembered


@pytest.mark.parametrize(
    "target, reason",
    [
        (b"origin.test", "host:port"),
        (b"origin.test:", "host:port"),
        (b"origin.test:0", "out of range"),
        (b"origin.test:70000", "out of range"),
        (b"user@origin.test:443", "host:port"),
        (b"::1:443", "host:port"),
        (b"h\xc3\xa9.test:443", "not ASCII"),
    ],
)
def test_refused_targets_are_refused_every_time(target: bytes, reason: str) -> None:
    for _ in range(2):  # a refusal is never remembered as an answer
        with pytest.raises(BadRequest, match=reason):
            parse_authority(target)


def test_a_long_target_is_parsed_each_time_not_remembered() -> None:
    target = b"h" * 600 + b".test:443"  # a memo of MEMO_MAX such targets would hold 2.5 MB
    assert parse_authority(target) == ("h" * 600 + ".test", 443)
    assert parse_authority(target) is not parse_authority(target)
