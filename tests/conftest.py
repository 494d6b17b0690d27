from __future__ import annotations

import json
import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import hypothesis  # noqa: F401  imported up front: a late import (pytest rewriting it at session end) trips CPython 3.11.7's AST recursion check
import pytest
import trustme

from tests.support.gateway import OPEN_POLICY, GatewayProcess
from tests.support.origin import EchoTcpServer, Origin
from tests.support.redis_server import RedisServer
from tests.support.worker import WorkerProcess


def require_binary(name: str, package: str) -> str:
    """Path of a program the test needs; fail (never skip) naming what to install."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install it (apt-get install {package})")
    return path


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def server_cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("cert")
    pem, key = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(pem))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(pem), append=True)
    cert.private_key_pem.write_to_path(str(key))
    return str(pem), str(key)


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    with Origin() as server:
        yield server


@pytest.fixture(scope="session")
def tls_origin(server_cert_files: tuple[str, str]) -> Iterator[Origin]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*server_cert_files)
    with Origin(tls=ctx) as server:
        yield server


@pytest.fixture(scope="session")
def echo_server() -> Iterator[EchoTcpServer]:
    with EchoTcpServer() as server:
        yield server


@pytest.fixture
def blocklist_file(tmp_path: Path) -> Path:
    path = tmp_path / "blocklist.json"
    path.write_text(json.dumps({"blocked_domains": ["blocked.test", "*.ads.test"]}))
    return path


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways with the given flags (open loopback policy unless `policy=False`)."""
    started: list[GatewayProcess] = []

    def start(
        *args: str, policy: bool = True, blocklist: Path | None = None, env: dict[str, str] | None = None
    ) -> GatewayProcess:
        flags = list(OPEN_POLICY if policy else ())
        if blocklist is None:
            blocklist = tmp_path / "blocklist.json"
            if not blocklist.exists():
                blocklist.write_text(json.dumps({"blocked_domains": ["blocked.test", "*.ads.test"]}))
        flags += ["--blocklist", str(blocklist), *args]
        gw = GatewayProcess(flags, tmp_path / f"gateway{len(started)}.log", env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One shared gateway with the open loopback policy, for tests that do not restart it."""
    folder = tmp_path_factory.mktemp("gw")
    blocklist = folder / "blocklist.json"
    blocklist.write_text(json.dumps({"blocked_domains": ["blocked.test", "*.ads.test"]}))
    gw = GatewayProcess([*OPEN_POLICY, "--blocklist", str(blocklist)], folder / "gateway.log")
    yield gw
    gw.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh real redis-server for one test (fails, naming the package, when missing)."""
    require_binary("redis-server", "redis-server")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    started: list[WorkerProcess] = []

    def start(*args: str, port: int = 0) -> WorkerProcess:
        w = WorkerProcess(["--engine", "echo", *args], tmp_path / f"worker{len(started)}.log", port)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
