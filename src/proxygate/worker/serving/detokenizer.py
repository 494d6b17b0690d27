"""Token ids to text, one token at a time, and the stop-string check.

`IncrementalDetokenizer` decodes only the unfinished tail of the output per
token (cost O(1) per step, not O(length)) and holds back a token that ends
inside a multi-byte character. `StopChecker` receives that text and decides
what may be sent: text that could still be the start of a stop string is
held back (at most the longest stop string's length minus one character,
as vLLM does), so a stop string split across tokens never leaks its first
part to the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


class IncrementalDetokenizer:
    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # ids before this index are final text
        self._read = 0  # ids before this index have been turned into text

    def push(self, token: int) -> str:
        """The text the newest token completes ("" while a character is still split)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]


class StopChecker:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._text = ""  # everything generated so far (up to a stop)
        self._sent = 0  # characters of _text already released
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add generated text; the part that may be sent now. After a stop string: "" forever."""
        if self.stopped or not piece:
            return ""
        start = max(0, len(self._text) - self._hold)  # a stop string can begin no earlier
        self._text += piece
        found = [at for at in (self._text.find(stop, start) for stop in self.stops) if at != -1]
        if found:
            self._text = self._text[: min(found)]  # the earliest stop string wins
            self.stopped = True
            return self._release(len(self._text))
        return self._release(len(self._text) - self._hold)

    def flush(self) -> str:
        """At the end of generation (not by a stop string): the held-back rest."""
        return "" if self.stopped else self._release(len(self._text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self._sent)
        out = self._text[self._sent : upto]
        self._sent = upto
        return out
