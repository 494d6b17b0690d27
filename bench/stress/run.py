"""Run every stress probe; exit 1 if any fails.

    .venv/bin/python -m bench.stress.run --quick     # CI: well under a minute
    .venv/bin/python -m bench.stress.run             # the long run (about 12 minutes)

Loopback only; every load loop is bounded in count and in time. Prints one
line per probe as it finishes, then a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .fuzz import run_fuzz
from .harness import Report
from .smuggling import run_smuggling
from .soak import KINDS, run_soak
from .ssrf import run_ssrf
from .worker_faults import run_worker_faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short version CI runs")
    parser.add_argument(
        "--fuzz-requests", type=int, help="mutated requests to send (default 3,000 quick, 100,000 long)"
    )
    parser.add_argument("--soak-seconds", type=float, help="soak length (default 8 quick, 600 long)")
    parser.add_argument("--work", help="folder for the processes' logs (default: a temporary one)")
    parser.add_argument(
        "--soak-kinds", default=",".join(KINDS), help=f"the soak's traffic, a comma list of {', '.join(KINDS)}"
    )
    parser.add_argument("--only-soak", action="store_true", help="run the soak alone (to study memory)")
    args = parser.parse_args(argv)
    fuzz_requests = args.fuzz_requests or (3_000 if args.quick else 100_000)
    soak_seconds = args.soak_seconds or (8.0 if args.quick else 600.0)
    report = Report()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="proxygate-stress-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.only_soak:
            run_fuzz(work, report, requests=fuzz_requests, seconds=60 if args.quick else 900)
            run_smuggling(work, report)
            run_ssrf(work, report)
            run_worker_faults(work, report, seconds=6 if args.quick else 30)
        kinds = tuple(k for k in args.soak_kinds.split(",") if k in KINDS)
        run_soak(work, report, seconds=soak_seconds, sample_every=1 if args.quick else 10, kinds=kinds)
    print(f"\n{'quick' if args.quick else 'long'} run, {time.monotonic() - started:.0f} s:\n")
    print(report.markdown())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
