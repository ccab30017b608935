"""What the dashboard tests share: one real perfdb server, seeded once per session, and the
dashboard built against it in-process (aiohttp test client) or as a process (for the browser)."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from perfdb.client import Client
from perfdb.web.app import WebConfig, build_app
from tests.support import DASHBOARD, REPO_ROOT, ServerProcess, closed_port_url, server_for_imports, token_hash
from tests.web.burst import BurstData, build_burst, load_burst
from tests.web.dense import dense_perfdb  # noqa: F401  (a fixture the chart tests share)
from tests.web.seed import GRPC_USER_NAME, SeedData, seed

ADMIN_KEY = "admin-" + secrets.token_hex(16)
GRPC_TOKEN = "grpc-bench-" + secrets.token_hex(16)
ARTIFACTS = REPO_ROOT / "test-artifacts" / "web"


@dataclasses.dataclass(frozen=True)
class SeededPerfdb:
    address: str
    data: SeedData


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededPerfdb]:
    """run_perf_db_server in a child process holding the seed data; read-only for the tests."""
    directory = tmp_path_factory.mktemp("perfdb-web")
    tokens_file = directory / "tokens.json"
    tokens_file.write_bytes(
        orjson.dumps({"tokens": [{"sha256": token_hash(GRPC_TOKEN), "user_id": "grpc-bench", "name": GRPC_USER_NAME}]})
    )
    admin_key_file = directory / "admin.key"
    admin_key_file.write_text(ADMIN_KEY)
    with ServerProcess(
        "--address=127.0.0.1:0",
        f"--database={directory / 'db'}",
        "--no-sync",
        f"--tokens-file={tokens_file}",
        f"--admin-key-file={admin_key_file}",
        f"--userinfo-url={closed_port_url()}",
    ) as process:
        address = f"127.0.0.1:{process.wait_listening()}"
        with Client(address) as client:
            data = seed(client, ADMIN_KEY, GRPC_TOKEN)
        yield SeededPerfdb(address, data)
        process.stop()


@dataclasses.dataclass(frozen=True)
class BurstPerfdb:
    address: str
    data: BurstData


@pytest.fixture(scope="session")
def burst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BurstPerfdb]:
    """A perfdb server holding a burst of 24,000 results from the last seconds; read-only for the tests."""
    with server_for_imports(tmp_path_factory.mktemp("perfdb-burst"), ADMIN_KEY) as address:
        data = build_burst()
        with Client(address) as client:
            load_burst(client, ADMIN_KEY, data)
        yield BurstPerfdb(address, data)


@contextlib.asynccontextmanager
async def dashboard_client(server: str, **settings: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """The dashboard application in-process, with an aiohttp test client in front of it."""
    app = build_app(WebConfig(server=server, **settings))
    async with TestClient(TestServer(app)) as client:
        yield client


def newest_first(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda record: record["record_id"], reverse=True)


# -- the dashboard as a process, for the browser ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DashboardProcess:
    url: str
    process: ServerProcess


@contextlib.contextmanager
def dashboard_process(server: str, *extra: str) -> Iterator[DashboardProcess]:
    """`python -m perfdb.web` (what the perfdb-web script runs) on a free port."""
    with ServerProcess("--server", server, "--listen", "127.0.0.1:0", *extra, command=DASHBOARD) as process:
        process.wait_listening()
        yield DashboardProcess(process.listening_on.rstrip("/"), process)
        # SIGTERM is how operators stop it: it must finish cleanly, having logged no traceback.
        code, log = process.stop(timeout=10)
    assert code == 0 and "Traceback" not in log, log[-2000:]
