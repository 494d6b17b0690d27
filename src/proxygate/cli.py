"""`proxygate gateway|worker ...`: the command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .runloop import run

USAGE = """usage: proxygate COMMAND [flags]

commands:
  gateway   run the forward proxy and inference gateway (proxygate gateway --help)
  worker    run a gRPC model worker (proxygate worker --help)
"""


def gateway_main(argv: Sequence[str]) -> int:
    from .config import settings_from_args
    from .observability.logging import setup_logging
    from .server import serve

    settings = settings_from_args(argv)
    setup_logging(settings.log_format, settings.debug)
    if settings.workers > 1:
        from .prefork import run_supervised

        return run_supervised(settings)
    return run(lambda: serve(settings))


def worker_main(argv: Sequence[str]) -> int:
    from .config import worker_settings_from_args
    from .observability.logging import setup_logging
    from .worker.engines import build_engine
    from .worker.server import serve_worker

    settings = worker_settings_from_args(argv)
    setup_logging(settings.log_format, settings.debug)
    return run(lambda: serve_worker(build_engine(settings), settings.host, settings.port))


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
    sys.stderr.write(f"proxygate: unknown command {command!r}\n{USAGE}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
