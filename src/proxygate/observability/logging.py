"""Application logs (json or text) and the one-line-per-request access log.

The access log bypasses the `logging` machinery: it is written on the hot
path, so it formats one line and appends it to a buffered stream that is
flushed a few times a second and at shutdown.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(log_format: str, debug: bool, stream: IO[str] | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("proxygate")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


class AccessLog:
    """Writes one line per finished request: the seed's fields plus bytes."""

    def __init__(self, log_format: str, stream: IO[str] | None = None) -> None:
        self.json = log_format == "json"
        self.stream = stream or sys.stderr

    def write(
        self,
        *,
        request_id: str,
        status: int,
        method: str,
        host: str,
        path: str,
        client_ip: str,
        duration_ms: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        if self.json:
            line = json.dumps(
                {
                    "time": stamp,
                    "level": "info",
                    "msg": "request",
                    "request_id": request_id,
                    "status": status,
                    "method": method,
                    "host": host,
                    "path": path,
                    "client_ip": client_ip,
                    "duration_ms": round(duration_ms, 3),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                },
                ensure_ascii=False,
            )
        else:
            line = (
                f"{stamp} {client_ip} {request_id} {method} {host}{path} {status} "
                f"{duration_ms:.1f}ms in={bytes_in} out={bytes_out}"
            )
        self.stream.write(line + "\n")

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass
