"""The last few failed requests of this process, for the status page.

A request counts as an error when it was answered 5xx, or when its answer
had begun and then failed (an inference stream that ended in an error event).
Bounded: the oldest entry goes when a new one comes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from .metrics_exchange import ErrorEntry

KEEP = 20


class RecentErrors:
    def __init__(self, keep: int = KEEP, clock: Callable[[], float] = time.time) -> None:
        self._entries: deque[ErrorEntry] = deque(maxlen=keep)
        self._clock = clock

    def add(
        self, *, status: int, method: str, host: str, path: str, client_ip: str, request_id: str, error: str
    ) -> None:
        self._entries.append(
            {
                "time": round(self._clock(), 3),
                "status": status,
                "method": method,
                "host": host,
                "path": path,
                "client_ip": client_ip,
                "request_id": request_id,
                "error": error[:300],
            }
        )

    def entries(self) -> list[ErrorEntry]:
        """Oldest first."""
        return list(self._entries)


def latest(entries: list[ErrorEntry], keep: int = KEEP) -> list[ErrorEntry]:
    """The newest `keep` of several processes' entries, newest first."""
    return sorted(entries, key=lambda e: e["time"], reverse=True)[:keep]
