"""The OpenAI-compatible endpoints, driven by the official openai SDK, unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from tests.support.gateway import GatewayProcess
from tests.support.inference import wait_healthy
from tests.support.worker import WorkerProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, WorkerProcess]]:
    folder = tmp_path_factory.mktemp("oai")
    worker = WorkerProcess(["--engine", "echo", "--model", "small", "--max-concurrency", "4"], folder / "w.log")
    gw = GatewayProcess(["-worker-addrs", worker.addr, "--blocklist", str(folder / "none.json")], folder / "g.log")
    wait_healthy(gw)
    yield gw, worker
    gw.stop()
    worker.stop()


@pytest.fixture
def client(stack: tuple[GatewayProcess, WorkerProcess]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack[0].proxy}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["small"]


def test_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model="small", prompt="one two three four", max_tokens=3)
    assert r.object == "text_completion" and r.model == "small"
    assert r.choices[0].text == "[small] one two " and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 3, 7)


def test_chat_completion_and_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="small", messages=messages)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "[small] be brief hello there "
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model="small", messages=messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[small] be brief hello there "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stream_ends_with_done(stack: tuple[GatewayProcess, WorkerProcess]) -> None:
    r = requests.post(
        f"{stack[0].proxy}/v1/completions", json={"model": "small", "prompt": "a b", "stream": True}, timeout=30
    )
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"


def test_errors_in_openai_shape(client: openai.OpenAI, stack: tuple[GatewayProcess, WorkerProcess]) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="huge", messages=[{"role": "user", "content": "x"}])
    assert "available: small" in err.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="small", messages=[])
    assert "messages" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="small", prompt="x", temperature=5)
    r = requests.post(f"{stack[0].proxy}/v1/chat/completions", data="{oops", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_priority_extra_field_and_header(client: openai.OpenAI, stack: tuple[GatewayProcess, WorkerProcess]) -> None:
    r = client.completions.create(model="small", prompt="x", extra_body={"priority": 9})
    assert r.choices[0].text
    r = client.completions.create(model="small", prompt="x", extra_headers={"X-Priority": "8"})
    assert r.choices[0].text
    text = requests.get(f"{stack[0].proxy}/metrics", timeout=5).text
    assert 'inference_requests_total{model="small",priority="high",status="success"} 2.0' in text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="small", prompt="x", extra_body={"priority": 99})


def test_chat_with_the_real_model(tmp_path: Path, start_gateway) -> None:
    from tests.integration.test_engines import _require_hf, _wait_ready

    _require_hf()
    worker = WorkerProcess(["--engine", "hf", "--threads", "2"], tmp_path / "hf.log")
    try:
        _wait_ready(worker)
        gw = start_gateway("-worker-addrs", worker.addr)
        wait_healthy(gw)
        client = openai.OpenAI(base_url=f"{gw.proxy}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[
                {"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            temperature=0,
            max_tokens=30,
        )
        assert "Paris" in r.choices[0].message.content
        assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
    finally:
        worker.stop()
