from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxygate.policy.ratelimit.resp import ReplyParser, RespError, encode_command


def test_encode() -> None:
    assert encode_command("EVALSHA", "ab", 1, "k") == b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n"


WIRE = b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n:1\r\n$3\r\n2.5\r\n-NOSCRIPT No matching script\r\n*0\r\n"


def test_parse_all_types() -> None:
    replies = ReplyParser().feed(WIRE)
    assert replies[:5] == [b"OK", 42, b"hello", None, [1, b"2.5"]]
    assert isinstance(replies[5], RespError) and replies[5].kind == "NOSCRIPT"
    assert replies[6] == []


@given(st.lists(st.integers(min_value=1, max_value=len(WIRE) - 1), max_size=8))
def test_any_split_gives_the_same_replies(cuts: list[int]) -> None:
    parser = ReplyParser()
    out = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(WIRE)]:
        out += parser.feed(WIRE[prev:cut])
        prev = cut
    assert [r if not isinstance(r, RespError) else str(r) for r in out] == [
        b"OK",
        42,
        b"hello",
        None,
        [1, b"2.5"],
        "NOSCRIPT No matching script",
        [],
    ]
