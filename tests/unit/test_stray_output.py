"""With -log-format json, what Python would print by itself arrives as JSON log lines.

Each case runs in a fresh interpreter (the hooks are process-wide), set up as
the command line sets up a gateway or a worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SETUP = """
from proxygate.observability.logging import capture_stray_output, setup_logging
setup_logging("json", False)
capture_stray_output("json")
"""

CASES = {
    "a thread's uncaught exception": """
        import threading
        t = threading.Thread(target=lambda: 1 / 0, name="doomed"); t.start(); t.join()
    """,
    "a warning": """
        import warnings
        warnings.warn("something odd", RuntimeWarning)
    """,
    "an exception in __del__": """
        class Bad:
            def __del__(self):
                raise ValueError("in del")
        Bad()
    """,
    "a future's exception nobody retrieved": """
        import asyncio, gc
        async def main():
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionResetError("peer gone"))
            del fut
            gc.collect()
        asyncio.run(main())
    """,
    "a library logger": """
        import logging
        logging.getLogger("grpc._cython").warning("library says %s", "hi")
        logging.getLogger("grpc._cython").info("below the libraries' level: not shown")
    """,
    "a progress bar": """
        from tqdm.auto import tqdm
        for _ in tqdm(range(3), desc="Loading weights"):
            pass
    """,
    "the main thread's uncaught exception": """
        raise RuntimeError("the end")
    """,
}


@pytest.mark.parametrize("case", CASES)
def test_only_json_lines(case: str) -> None:
    code = SETUP + textwrap.dedent(CASES[case])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stderr.splitlines() + out.stdout.splitlines()
    entries = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all({"time", "level", "msg"} <= e.keys() for e in entries)
    if case != "a progress bar":
        assert entries, f"{case}: nothing was logged"
    assert not any("below the libraries' level" in e["msg"] for e in entries)
