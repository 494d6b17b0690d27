"""The stress harness's short version (bench/stress): fuzzing, smuggling, SSRF, worker faults, a soak.

It runs as its own process, as an operator would run it; its long version's
results are in bench/RESULTS.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_stress_quick(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.stress.run", "--quick", "--work", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "| probe | result | measured |" in out.stdout and "**FAIL**" not in out.stdout
