"""`proxygate worker --engine hf --quantize int4`: the shipped SmolLM2 on its own 4-bit weights.

Its own file so that it runs beside test_engines.py rather than after it
(pytest -n 2 --dist loadfile keeps a file on one process).
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_engines import _require_hf, _wait_ready, generate, text_of
from tests.support.worker import WorkerProcess


def test_int4_worker_answers_over_grpc(tmp_path: Path) -> None:
    _require_hf()
    log_path = tmp_path / "worker.log"
    worker = WorkerProcess(["--engine", "hf", "--quantize", "int4", "--threads", "2"], log_path)
    try:
        _wait_ready(worker)
        assert "int4 weights" in log_path.read_text()
        # The templated prompt (over 8 tokens) is read on the float16 copy; the greedy decode
        # steps are one row each: the 4-bit kernel, through the TorchScript step.
        msgs = generate(worker, "", max_tokens=20, messages=[("user", "What is the capital of France?")])
        assert "Paris" in text_of(msgs), text_of(msgs)
        assert msgs[-1].finished and msgs[-1].finish_reason in ("stop", "length")
    finally:
        worker.stop()
