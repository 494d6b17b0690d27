"""A configuration file that is loaded at start and reloaded on SIGHUP or change.

A reload that fails (unreadable, broken) keeps the current value and logs why:
an operator's typo never takes the old configuration away.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("proxygate.config")


class WatchedFile(Generic[T]):
    def __init__(
        self,
        kind: str,
        path: str,
        parse: Callable[[str], T],
        empty: T,
        describe: Callable[[T], str],
        error: type[Exception],
        *,
        missing_ok: bool,
    ) -> None:
        self.kind = kind  # "blocklist", "routes": for log lines
        self.path = path
        self.parse = parse
        self.current = empty
        self.describe = describe
        self.error = error  # what `parse` raises for a broken file
        self.missing_ok = missing_ok  # at start, a missing file is a warning, not an error
        self._stamp: tuple[int, int, int] | None = None

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load_initial(self) -> None:
        """Load at start: a broken file raises (the process refuses to start);
        a missing one is a warning when `missing_ok`, else it raises too."""
        self._stamp = self._file_stamp()
        if self._stamp is None and self.missing_ok:
            log.warning("%s %s not found; starting without it", self.kind, self.path)
            return
        with open(self.path, encoding="utf-8") as fh:
            self.current = self.parse(fh.read())
        log.info("%s loaded: %s from %s", self.kind, self.describe(self.current), self.path)

    def reload(self) -> bool:
        """Read the file again; on any error keep the current value. Whether it changed."""
        self._stamp = self._file_stamp()  # a broken file is not retried every second
        try:
            with open(self.path, encoding="utf-8") as fh:
                new = self.parse(fh.read())
        except (OSError, UnicodeDecodeError, self.error) as exc:
            log.error("%s reload failed, keeping %s: %s (%s)", self.kind, self.describe(self.current), exc, self.path)
            return False
        self.current = new
        log.info("%s reloaded: %s from %s", self.kind, self.describe(new), self.path)
        return True

    def changed_on_disk(self) -> bool:
        stamp = self._file_stamp()
        return stamp is not None and stamp != self._stamp
