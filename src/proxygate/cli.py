"""`proxygate gateway|worker ...`: the command line."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from .runloop import run

USAGE = """usage: proxygate COMMAND [flags]

commands:
  gateway   run the forward proxy and inference gateway (proxygate gateway --help)
  worker    run a gRPC model worker (proxygate worker --help)
  keys      manage API keys: proxygate keys add NAME [--file FILE] [limits] (proxygate keys add --help)
"""


def gateway_main(argv: Sequence[str]) -> int:
    from .config import settings_from_args
    from .observability.logging import capture_stray_output, setup_logging
    from .server import serve

    settings = settings_from_args(argv)
    setup_logging(settings.log_format, settings.debug)
    capture_stray_output(settings.log_format)
    if settings.workers > 1:
        from .prefork import run_supervised, runtime_folder

        folder = runtime_folder(settings)
        if folder is not None:
            return run_supervised(settings, folder)
        settings = dataclasses.replace(settings, workers=1)
    return run(lambda: serve(settings))


def worker_main(argv: Sequence[str]) -> int:
    from .config import worker_settings_from_args
    from .observability.logging import capture_stray_output, setup_logging
    from .worker.engines import build_engine
    from .worker.server import serve_worker

    settings = worker_settings_from_args(argv)
    setup_logging(settings.log_format, settings.debug)
    capture_stray_output(settings.log_format)
    return run(lambda: serve_worker(build_engine(settings), settings.host, settings.port))


def keys_main(argv: Sequence[str]) -> int:
    import argparse
    import os

    from .policy.keys import KeysError, add_key

    parser = argparse.ArgumentParser(prog="proxygate keys", description="Manage the gateway's API key file.")
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a key; prints its token once (the file keeps only its SHA-256)")
    add.add_argument("name", help="the key's name: its tenant label in limits, metrics and logs")
    add.add_argument(
        "--file",
        default=os.environ.get("PROXYGATE_API_KEYS") or "api-keys.toml",
        help="the key file (default $PROXYGATE_API_KEYS or ./api-keys.toml); created if missing",
    )
    add.add_argument("--requests-per-minute", type=int)
    add.add_argument("--tokens-per-minute", type=int)
    add.add_argument("--models", help="comma list of route/model names it may use (default any)")
    add.add_argument("--max-priority", type=int)
    add.add_argument("--weight", type=float)
    add.add_argument("--no-proxy", action="store_true", help="may not use the forward proxy")
    ns = parser.parse_args(list(argv))
    try:
        token = add_key(
            ns.file,
            ns.name,
            requests_per_minute=ns.requests_per_minute,
            tokens_per_minute=ns.tokens_per_minute,
            models=[m for m in ns.models.split(",") if m] if ns.models else None,
            max_priority=ns.max_priority,
            weight=ns.weight,
            proxy=False if ns.no_proxy else None,
        )
    except (KeysError, OSError) as exc:
        sys.stderr.write(f"proxygate keys: {exc}\n")
        return 1
    sys.stdout.write(token + "\n")
    sys.stderr.write(f"key {ns.name!r} added to {ns.file}; the token above is not stored anywhere: keep it\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "gateway":
        return gateway_main(rest)
    if command == "worker":
        return worker_main(rest)
    if command == "keys":
        return keys_main(rest)
    sys.stderr.write(f"proxygate: unknown command {command!r}\n{USAGE}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
