"""API keys: who may use the gateway, with which limits (`--api-keys FILE`).

The file is TOML, one table per key, and holds only the SHA-256 hex digest of
each bearer token (the token itself is shown once, by `proxygate keys add`):

    [keys.team-a]
    sha256 = "9f86d0…"            # of the bearer token
    requests_per_minute = 600    # each limit optional
    tokens_per_minute = 100000   # prompt + completion tokens
    models = ["small", "auto"]   # optional allow-list of route/model names
    max_priority = 5             # optional ceiling on the priority it may ask for
    weight = 1                   # share of the queue under contention
    proxy = true                 # may use the forward proxy

A presented token is hashed and looked up by digest, so the table never
holds a secret and a lookup takes the same time whatever the token.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import tomllib
from dataclasses import dataclass
from typing import Any

from ..config_tables import optional_int
from ..watched_file import WatchedFile

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYS = {
    "sha256",
    "requests_per_minute",
    "tokens_per_minute",
    "models",
    "max_priority",
    "weight",
    "proxy",
}


class KeysError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str  # the tenant: a bounded label for limits, fairness, metrics and logs
    sha256: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    models: frozenset[str] | None = None  # None: any
    max_priority: int = 10
    weight: float = 1.0
    proxy: bool = True

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class KeyTable:
    def __init__(self, keys: dict[str, ApiKey] | None = None) -> None:
        self.by_name = keys or {}
        self._by_digest = {k.sha256: k for k in self.by_name.values()}

    def __len__(self) -> int:
        return len(self.by_name)

    def lookup(self, token: str) -> ApiKey | None:
        return self._by_digest.get(digest(token))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return "pg-" + secrets.token_urlsafe(32)


def parse_keys(text: str) -> KeyTable:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysError(f"invalid TOML: {exc}") from None
    if set(doc) - {"keys"}:
        raise KeysError("expected only [keys.NAME] tables")
    tables = doc.get("keys", {})
    if not isinstance(tables, dict):
        raise KeysError("keys must be tables: [keys.NAME]")
    keys: dict[str, ApiKey] = {}
    seen: set[str] = set()
    for name, table in tables.items():
        where = f"keys.{name}"
        if not NAME.fullmatch(name):
            raise KeysError(f"{where}: a name is letters, digits, '_', '.', '-' (at most 64)")
        if not isinstance(table, dict):
            raise KeysError(f"{where} must be a table")
        extra = set(table) - _KEYS
        if extra:
            raise KeysError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        sha = table.get("sha256")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha.lower()):
            raise KeysError(f"{where}.sha256 must be the 64-hex-digit SHA-256 of the token")
        sha = sha.lower()
        if sha in seen:
            raise KeysError(f"{where}: the same token digest as another key")
        seen.add(sha)
        models = table.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise KeysError(f"{where}.models must be a list of route or model names")
        weight = table.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
            raise KeysError(f"{where}.weight must be a number in (0, 1000]")
        proxy = table.get("proxy", True)
        if not isinstance(proxy, bool):
            raise KeysError(f"{where}.proxy must be true or false")
        keys[name] = ApiKey(
            name=name,
            sha256=sha,
            requests_per_minute=optional_int(table, "requests_per_minute", where, KeysError, 1),
            tokens_per_minute=optional_int(table, "tokens_per_minute", where, KeysError, 1),
            models=frozenset(models) if models is not None else None,
            max_priority=optional_int(table, "max_priority", where, KeysError, 1, 10) or 10,
            weight=float(weight),
            proxy=proxy,
        )
    return KeyTable(keys)


class KeyFile(WatchedFile[KeyTable]):
    """The key file (`current`), reloaded on SIGHUP and on change; a broken file keeps the old keys."""

    def __init__(self, path: str) -> None:
        super().__init__(
            "api keys", path, parse_keys, KeyTable(), lambda t: f"{len(t)} keys", KeysError, missing_ok=False
        )


def bearer_token(value: bytes | None) -> str | None:
    """The token of an `Authorization: Bearer …` header value."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip().decode("latin-1")


def basic_credentials(value: bytes | None) -> tuple[str, str] | None:
    """(name, token) of a `Proxy-Authorization: Basic …` header value."""
    if value is None:
        return None
    scheme, _, encoded = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    name, sep, token = decoded.partition(":")
    return (name, token) if sep else None


def add_key(path: str, name: str, **limits: Any) -> str:
    """Append a new key named `name` to the file at `path`; the new token (shown once)."""
    if not NAME.fullmatch(name):
        raise KeysError("a key name is letters, digits, '_', '.', '-' (at most 64)")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        text = ""
    table = parse_keys(text) if text.strip() else KeyTable()
    if name in table.by_name:
        raise KeysError(f"a key named {name!r} exists already")
    token = new_token()
    lines = [f"[keys.{name}]", f'sha256 = "{digest(token)}"']
    for field, value in limits.items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"{field} = {'true' if value else 'false'}")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{field} = [{', '.join(_toml_str(v) for v in value)}]")
        else:
            lines.append(f"{field} = {value}")
    block = "\n".join(lines) + "\n"
    new_text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    parse_keys(new_text)  # never write a file the gateway would refuse
    # Written beside and renamed over: a gateway watching the file never reads half of it.
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(new_text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return token


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
