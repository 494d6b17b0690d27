"""Start real `proxygate worker` processes on 127.0.0.1:0, and a seed-only worker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from proxygate._pb import inference_pb2, inference_pb2_grpc

LISTENING = re.compile(r"worker listening on 127\.0\.0\.1:(\d+)")


class WorkerProcess:
    def __init__(self, args: list[str], log_path: Path, port: int = 0, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = env or {}
        self.log_path = log_path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxygate", "worker", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_path.read_text(errors="replace")[offset:])
            if match:
                self.port = int(match.group(1))
                self.addr = f"127.0.0.1:{self.port}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text()}")
            time.sleep(0.05)
        raise RuntimeError("worker did not start")

    def health(self) -> inference_pb2.HealthResponse:
        with grpc.insecure_channel(self.addr) as channel:
            return inference_pb2_grpc.ModelServiceStub(channel).Health(inference_pb2.HealthRequest(), timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class _SeedServicer(inference_pb2_grpc.ModelServiceServicer):
    """Answers with the seed's fields only (no extensions set)."""

    async def Generate(self, request, context):  # type: ignore[override]
        words = [f"[{request.model}]"] + request.prompt.split()
        for i, word in enumerate(words[: request.max_tokens], 1):
            yield inference_pb2.TokenResponse(request_id=request.request_id, token=word + " ", token_count=i)
        yield inference_pb2.TokenResponse(
            request_id=request.request_id, finished=True, token_count=min(len(words), request.max_tokens)
        )

    async def Health(self, request, context):  # type: ignore[override]
        return inference_pb2.HealthResponse(healthy=True, current_queue_size=0, gpu_utilization=0.0)


class SeedWorker:
    """A worker that speaks only the seed's proto fields, in a process of its own.

    (grpc.aio wants one event loop per process; a thread with a second loop
    sometimes hung on shutdown.)
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.worker"],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on (\d+)", line)
        if not match:
            raise RuntimeError(f"seed worker did not start: {line!r}")
        self.port = int(match.group(1))
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _serve_seed() -> None:
    server = grpc.aio.server()
    inference_pb2_grpc.add_ModelServiceServicer_to_server(_SeedServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve_seed())
