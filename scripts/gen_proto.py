#!/usr/bin/env python3
"""Generate the gRPC stubs from proto/inference.proto into src/proxygate/_pb (or a given folder).

`make proto` runs this; tests/unit/test_proto.py regenerates into a temporary
folder and fails when the committed stubs differ (stale).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path) -> None:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "proto" / "inference.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = out / "inference_pb2_grpc.py"
    # protoc writes a top-level import; the stubs live inside a package.
    text = re.sub(r"^import inference_pb2 as", "from . import inference_pb2 as", grpc_file.read_text(), flags=re.M)
    grpc_file.write_text(text)
    init = out / "__init__.py"
    init.write_text('"""Generated gRPC stubs for proto/inference.proto (make proto); do not edit."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src" / "proxygate" / "_pb")
