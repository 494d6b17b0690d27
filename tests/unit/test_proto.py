"""The committed gRPC stubs are what `make proto` generates from proto/inference.proto."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from gen_proto import generate  # noqa: E402

from proxygate._pb import inference_pb2  # noqa: E402


def test_stubs_are_current(tmp_path: Path) -> None:
    generate(tmp_path)
    committed = ROOT / "src" / "proxygate" / "_pb"
    for name in ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py", "__init__.py"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), f"{name} is stale: run make proto"


def test_seed_field_numbers_are_kept() -> None:
    fields = {f.name: f.number for f in inference_pb2.GenerateRequest.DESCRIPTOR.fields}
    assert {k: fields[k] for k in ("request_id", "model", "prompt", "temperature", "max_tokens", "priority")} == {
        "request_id": 1,
        "model": 2,
        "prompt": 3,
        "temperature": 4,
        "max_tokens": 5,
        "priority": 6,
    }
    fields = {f.name: f.number for f in inference_pb2.TokenResponse.DESCRIPTOR.fields}
    assert {k: fields[k] for k in ("request_id", "token", "finished", "error", "token_count")} == {
        "request_id": 1,
        "token": 2,
        "finished": 3,
        "error": 4,
        "token_count": 5,
    }
    fields = {f.name: f.number for f in inference_pb2.HealthResponse.DESCRIPTOR.fields}
    assert {k: fields[k] for k in ("healthy", "current_queue_size", "gpu_utilization")} == {
        "healthy": 1,
        "current_queue_size": 2,
        "gpu_utilization": 3,
    }
    for message in (inference_pb2.GenerateRequest, inference_pb2.TokenResponse, inference_pb2.HealthResponse):
        extensions = [f.number for f in message.DESCRIPTOR.fields if f.number > 6]
        assert all(n >= 16 for n in extensions), message
