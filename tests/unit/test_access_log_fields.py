"""The host and path an access-log line names, for every request-target form (pure logic)."""

from __future__ import annotations

import pytest

from proxygate.gateway import _log_host_path
from proxygate.http.message import Request


def request(method: str, target: bytes, host: bytes | None = None) -> Request:
    return Request(method, target, b"1.1", [], True, None, "id", "127.0.0.1", host)


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"http://origin.test/small", ("origin.test", "/small")),
        (b"http://origin.test:8080/a/b?q=1#f", ("origin.test:8080", "/a/b")),
        (b"http://origin.test", ("origin.test", "/")),
        (b"http://origin.test?q", ("origin.test?q", "/")),  # no path: all of it is the authority
        (b"HTTP://[::1]:80/x#y", ("[::1]:80", "/x")),
        (b"ftp://a://b/c", ("a:", "//b/c")),  # the first :// ends the scheme
        (b"origin.test/p", ("origin.test", "/p")),  # no scheme (a 400, still logged)
        (b"\xff.test/\xfe", ("\xff.test", "/\xfe")),
    ],
)
def test_absolute_form(target: bytes, expected: tuple[str, str]) -> None:
    assert _log_host_path(request("GET", target)) == expected
    assert _log_host_path(request("GET", target)) is _log_host_path(request("HEAD", target))  # remembered


def test_origin_form_connect_and_long_values() -> None:
    assert _log_host_path(request("GET", b"/v1/models?x=1", b"gw.test")) == ("gw.test", "/v1/models")
    assert _log_host_path(request("CONNECT", b"origin.test:443")) == ("origin.test:443", "")
    host, path = _log_host_path(request("GET", b"http://" + b"h" * 300 + b"/" + b"p" * 600))
    assert (len(host), len(path)) == (256, 512)
