"""Application logs (json or text) and the one-line-per-request access log.

The access log bypasses the `logging` machinery: it is written on the hot
path, so it formats one line and appends it to a buffer that is written out
a few times a second, when it fills, and at shutdown. Every write() carries
whole lines and at most PIPE_BUF bytes, so lines from several serving
processes sharing one stdout never cut into each other.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import threading
import time
from typing import IO, Any

from ..memo import remember


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(log_format: str, debug: bool, stream: IO[str] | None = None) -> None:
    """One handler, on the root logger: our loggers at INFO (DEBUG with `debug`),
    libraries' (asyncio, grpc, transformers once it propagates) at WARNING, all
    in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    ours = logging.getLogger("proxygate")
    ours.handlers.clear()
    ours.setLevel(logging.DEBUG if debug else logging.INFO)
    ours.propagate = True


def capture_stray_output(log_format: str) -> None:
    """Route what Python would print by itself through logging, for a whole process.

    Uncaught exceptions (main thread or others), exceptions nobody could raise
    (in __del__, in callbacks), and warnings all become log records; in json
    mode progress bars (tqdm, used by transformers' model loading) are off.
    So with `-log-format json` stderr carries nothing but JSON lines. Called
    once by the command line, never by library code or tests.
    """
    log = logging.getLogger("proxygate")
    logging.captureWarnings(True)

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        log.critical("uncaught exception", exc_info=(kind, value, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.error("uncaught exception in thread %s", name, exc_info=args.exc_value or True)

    def unraisablehook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        where = unraisable.err_msg or "exception ignored"
        info = (type(exc), exc, unraisable.exc_traceback) if exc is not None else None
        log.error("%s: %r", where, unraisable.object, exc_info=info)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
    if log_format == "json":
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _json_str(text: str) -> str:
    """A JSON string literal; the common plain-ASCII case without json.dumps."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text, ensure_ascii=False)


# Formatting a line's numbers costs more than the rest of it (callgrind: an int
# about 1,100 instructions, a float with `:.3f` 2,400): the parts that repeat are
# looked up instead.
_STATUS = {status: str(status) for status in range(100, 600)}
_THOUSANDTHS = tuple(f"{n:03d}" for n in range(1000))


class AccessLog:
    """Writes one line per finished request: the seed's fields plus bytes.

    The JSON line is assembled by hand (about 4x cheaper than json.dumps of a
    dict); every string field goes through `_json_str`, the host and path
    remembered (they repeat, and checking a string for JSON costs about
    2,600 instructions).
    """

    def __init__(self, log_format: str, stream: IO[str] | None = None) -> None:
        self.json = log_format == "json"
        # Python's stdout would write a line per call (or cut lines at its
        # buffer's edge); lines collect here and go out in whole-line writes.
        self.stream = stream
        self._fd = sys.stdout.fileno() if stream is None else -1
        self._lines: list[bytes] = []
        self._pending = 0
        self._ms = -1
        self._second = -1
        self._day_time = ""
        self._stamp = ""
        self._quoted: dict[str, str] = {}  # host or path -> its JSON literal

    def _timestamp(self, ms: int) -> str:
        """The time stamp of millisecond `ms` (since the epoch), made once per ms:
        `write` reuses the last one while requests end within the same ms."""
        self._ms = ms
        second = ms // 1000
        if second != self._second:
            self._second = second
            self._day_time = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._stamp = f"{self._day_time}.{_THOUSANDTHS[ms % 1000]}Z"
        return self._stamp

    def _quote(self, text: str) -> str:
        """`text` as a JSON literal, remembered (`write` looks it up first)."""
        return remember(self._quoted, text, _json_str(text))

    def write(
        self,
        request_id: str,
        status: int,
        method: str,
        host: str,
        path: str,
        client_ip: str,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        fields: tuple[tuple[str, str], ...] = (),
        /,
    ) -> None:
        """One request's line; `seconds` it took (written in milliseconds, to the microsecond).

        Positional: keyword arguments cost half as much again as the call's work."""
        # The remembered parts are looked up here, not through calls: a method
        # call costs as much as the lookup's whole work.
        now_ms = int(time.time() * 1000)
        stamp = self._stamp if now_ms == self._ms else self._timestamp(now_ms)
        status_text = _STATUS.get(status) or str(status)
        micros = int(seconds * 1_000_000)
        ms = micros // 1000
        thousandths = _THOUSANDTHS[micros - ms * 1000]
        if self.json:
            # request_id (a checked token or ours), method (an HTTP token checked by
            # the parser) and client_ip (an address) need no escaping; host and path may.
            quoted = self._quoted
            json_host = quoted.get(host) or self._quote(host)
            json_path = quoted.get(path) or self._quote(path)
            line = (
                f'{{"time":"{stamp}","level":"info","msg":"request","request_id":"{request_id}",'
                f'"status":{status_text},"method":"{method}","host":{json_host},'
                f'"path":{json_path},"client_ip":"{client_ip}","duration_ms":{ms}.{thousandths},'
                f'"bytes_in":{bytes_in},"bytes_out":{bytes_out}'
                + ("".join(f",{_json_str(k)}:{_json_str(v)}" for k, v in fields) if fields else "")
                + "}\n"
            )
        else:
            line = (
                f"{stamp} {client_ip} {request_id} {method} {host}{path} {status_text} "
                f"{ms}.{thousandths[0]}ms in={bytes_in} out={bytes_out}"
                + ("".join(f" {k}={v}" for k, v in fields) if fields else "")
                + "\n"
            )
        data = line.encode("utf-8", "replace")
        self._lines.append(data)
        self._pending += len(data)
        if self._pending >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        lines, self._lines, self._pending = self._lines, [], 0
        if not lines:
            return
        if self.stream is not None:
            self.stream.write(b"".join(lines).decode("utf-8"))
            self.stream.flush()
            return
        try:
            for chunk in _whole_line_chunks(lines, select.PIPE_BUF):
                _write_all(self._fd, chunk)
        except OSError:
            pass  # stdout gone (a closed pipe): the lines are dropped, serving goes on


_FLUSH_AT = 32 * 1024


def _whole_line_chunks(lines: list[bytes], limit: int) -> list[bytes]:
    """Lines joined into chunks of at most `limit` bytes (a longer line alone)."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(b"".join(current))
    return chunks


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]
