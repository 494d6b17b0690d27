"""The access-log line itself (pure logic): valid JSON whatever the host and path hold,
the duration to the microsecond, the text form, and what a line carries beyond the seed's."""

from __future__ import annotations

import io
import json

from proxygate.observability.logging import AccessLog


def lines(log: AccessLog, stream: io.StringIO) -> list[str]:
    log.flush()
    return stream.getvalue().splitlines()


def test_json_lines_escape_what_they_must_and_keep_the_duration_to_the_microsecond() -> None:
    stream = io.StringIO()
    log = AccessLog("json", stream=stream)
    log.write("id1", 200, "GET", "origin.test", "/small", "127.0.0.1", 0.0032141, 0, 1234)
    log.write("id2", 403, "GET", 'we"ird\\host', "/p\u00e4th\n", "::1", 12.5, 17, 0, (("model", "m\t1"),))
    log.write("id3", 200, "GET", "origin.test", "/small", "127.0.0.1", 0.0000004, 0, 5)  # remembered quoting
    log.write("id4", 999, "GET", "", "", "127.0.0.1", 1.0, 0, 0)  # a status outside the table
    first, second, third, fourth = (json.loads(line) for line in lines(log, stream))
    assert {k: first[k] for k in ("request_id", "status", "method", "host", "path", "client_ip")} == {
        "request_id": "id1",
        "status": 200,
        "method": "GET",
        "host": "origin.test",
        "path": "/small",
        "client_ip": "127.0.0.1",
    }
    assert first["duration_ms"] == 3.214 and (first["bytes_in"], first["bytes_out"]) == (0, 1234)
    assert first["level"] == "info" and first["msg"] == "request" and first["time"].endswith("Z")
    assert (second["host"], second["path"], second["status"]) == ('we"ird\\host', "/p\u00e4th\n", 403)
    assert second["duration_ms"] == 12500.0 and second["model"] == "m\t1"
    assert third["duration_ms"] == 0.0 and third["host"] == "origin.test"
    assert fourth["status"] == 999 and fourth["duration_ms"] == 1000.0


def test_text_lines() -> None:
    stream = io.StringIO()
    log = AccessLog("text", stream=stream)
    log.write("id1", 200, "GET", "origin.test", "/small", "127.0.0.1", 0.00329, 3, 1234, (("model", "m1"),))
    (line,) = lines(log, stream)
    assert line.split(" ", 1)[1] == "127.0.0.1 id1 GET origin.test/small 200 3.2ms in=3 out=1234 model=m1"
