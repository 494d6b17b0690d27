"""Model routes: the names clients ask for, and which worker models serve them.

A routes file (`--routes FILE`, TOML) maps each name to an ordered list of
worker-reported models (later ones are fallbacks), or, for a chooser such as
`auto`, to one of two other names picked per request:

    [models.small]
    serve = ["SmolLM2-135M-Instruct"]
    [models.large]
    serve = ["SmolLM2-360M-Instruct", "SmolLM2-135M-Instruct"]
    max_tokens = 1024
    [models.auto]
    small = "small"
    large = "large"
    large_if_prompt_tokens_over = 400
    large_if_max_tokens_over = 256
    large_if_matches = ['(?i)\\b(prove|derive|step by step)\\b']

A chooser picks `large` when any of its rules holds, else `small`. The
gateway has no tokenizer, so "prompt tokens" is estimated as UTF-8 bytes / 4
(rounded up), the usual rule of thumb for BPE tokenizers on English text;
`max_tokens` counts only when the client asked for it; patterns are matched
against the last user message (or the whole prompt of a completion).

Without a routes file every request routes by exact worker-reported model
name (`direct`), `default-model` meaning any worker. The file is parsed into
an immutable `RouteTable`; a reload that fails keeps the old table.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass

from ..config_tables import optional_int
from ..watched_file import WatchedFile

ANY = ""  # a candidate meaning "any worker" (default-model)


class RoutesError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Route:
    serve: tuple[str, ...]
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Chooser:
    small: str
    large: str
    prompt_tokens_over: int | None = None
    max_tokens_over: int | None = None
    patterns: tuple[re.Pattern[str], ...] = ()
    max_tokens: int | None = None

    def wants_large(self, text: str, max_tokens: int | None) -> bool:
        if self.prompt_tokens_over is not None and estimate_tokens(text) > self.prompt_tokens_over:
            return True
        if self.max_tokens_over is not None and max_tokens is not None and max_tokens > self.max_tokens_over:
            return True
        return any(p.search(text) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """Where a request may go: its route name, candidate models in order, why, and a cap."""

    route: str
    candidates: tuple[str, ...]
    reason: str  # direct | small | large (fallback is decided later, on worker state)
    max_tokens: int | None = None


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / 4)


def _cap(*caps: int | None) -> int | None:
    present = [c for c in caps if c is not None]
    return min(present) if present else None


class RouteTable:
    def __init__(self, routes: dict[str, Route | Chooser] | None = None) -> None:
        self.routes = routes or {}

    def names(self) -> list[str]:
        return sorted(self.routes)

    def resolve(self, name: str, text: str, max_tokens: int | None) -> RouteChoice | None:
        """The route for `name`, or None when the table does not know it.

        `text` is what chooser patterns look at; `max_tokens` is the client's
        own request (None when it asked for none).
        """
        route = self.routes.get(name)
        if route is None:
            return None
        if isinstance(route, Chooser):
            size = "large" if route.wants_large(text, max_tokens) else "small"
            target = self.routes[route.large if size == "large" else route.small]
            assert isinstance(target, Route)  # checked at parse time
            return RouteChoice(name, target.serve, size, _cap(route.max_tokens, target.max_tokens))
        return RouteChoice(name, route.serve, "direct", route.max_tokens)


_ROUTE_KEYS = {"serve", "max_tokens"}
_CHOOSER_KEYS = {
    "small",
    "large",
    "large_if_prompt_tokens_over",
    "large_if_max_tokens_over",
    "large_if_matches",
    "max_tokens",
}


def parse_routes(text: str) -> RouteTable:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RoutesError(f"invalid TOML: {exc}") from None
    unknown = set(doc) - {"models"}
    if unknown:
        raise RoutesError(f"unknown top-level key(s): {', '.join(sorted(unknown))} (expected [models.NAME] tables)")
    models = doc.get("models", {})
    if not isinstance(models, dict) or not models:
        raise RoutesError("no [models.NAME] tables")
    routes: dict[str, Route | Chooser] = {}
    for name, table in models.items():
        where = f"models.{name}"
        if not isinstance(table, dict):
            raise RoutesError(f"{where} must be a table")
        if "serve" in table:
            extra = set(table) - _ROUTE_KEYS
            if extra:
                raise RoutesError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
            serve = table["serve"]
            if not isinstance(serve, list) or not serve or not all(isinstance(m, str) and m for m in serve):
                raise RoutesError(f"{where}.serve must be a non-empty list of model names")
            routes[name] = Route(tuple(serve), optional_int(table, "max_tokens", where, RoutesError, 1))
        elif "small" in table or "large" in table:
            extra = set(table) - _CHOOSER_KEYS
            if extra:
                raise RoutesError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
            patterns = table.get("large_if_matches", [])
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise RoutesError(f"{where}.large_if_matches must be a list of regular expressions")
            compiled = []
            for p in patterns:
                try:
                    compiled.append(re.compile(p))
                except re.error as exc:
                    raise RoutesError(f"{where}.large_if_matches: {p!r}: {exc}") from None
            small, large = table.get("small"), table.get("large")
            if not isinstance(small, str) or not isinstance(large, str):
                raise RoutesError(f"{where} needs both small and large (names of other routes)")
            routes[name] = Chooser(
                small=small,
                large=large,
                prompt_tokens_over=optional_int(table, "large_if_prompt_tokens_over", where, RoutesError, 0),
                max_tokens_over=optional_int(table, "large_if_max_tokens_over", where, RoutesError, 0),
                patterns=tuple(compiled),
                max_tokens=optional_int(table, "max_tokens", where, RoutesError, 1),
            )
        else:
            raise RoutesError(f"{where} needs serve = [...] or small/large")
    for name, route in routes.items():
        if isinstance(route, Chooser):
            for target in (route.small, route.large):
                if not isinstance(routes.get(target), Route):
                    raise RoutesError(f"models.{name}: {target!r} is not a route with serve = [...]")
    return RouteTable(routes)


class RoutesFile(WatchedFile[RouteTable]):
    """The routes file (`current`); with no path, the empty table (route by model name)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            "routes", path, parse_routes, RouteTable(), lambda t: ", ".join(t.names()), RoutesError, missing_ok=False
        )
