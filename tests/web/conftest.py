"""What the dashboard tests share: one real perfdb server, seeded once per session, and the
dashboard built against it in-process (aiohttp test client) or as a process (for the browser)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from perfdb.client import Client
from perfdb.web.app import WebConfig, build_app
from tests.support import REPO_ROOT, ServerProcess, token_hash
from tests.web.burst import BurstData, build_burst, load_burst
from tests.web.seed import GRPC_USER_NAME, SeedData, seed

ADMIN_KEY = "admin-" + secrets.token_hex(16)
GRPC_TOKEN = "grpc-bench-" + secrets.token_hex(16)
UNREACHABLE_USERINFO = "http://127.0.0.1:9/userinfo"
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
    process = ServerProcess(
        "--address=127.0.0.1:0",
        f"--database={directory / 'db'}",
        "--no-sync",
        f"--tokens-file={tokens_file}",
        f"--admin-key-file={admin_key_file}",
        f"--userinfo-url={UNREACHABLE_USERINFO}",
    )
    try:
        address = f"127.0.0.1:{process.wait_listening()}"
        with Client(address) as client:
            data = seed(client, ADMIN_KEY, GRPC_TOKEN)
        yield SeededPerfdb(address, data)
    finally:
        if process.process.poll() is None:
            process.process.send_signal(signal.SIGTERM)
            process.finish()


@dataclasses.dataclass(frozen=True)
class BurstPerfdb:
    address: str
    data: BurstData


@pytest.fixture(scope="session")
def burst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BurstPerfdb]:
    """A perfdb server holding a burst of 24,000 results from the last seconds; read-only for the tests."""
    directory = tmp_path_factory.mktemp("perfdb-burst")
    admin_key_file = directory / "admin.key"
    admin_key_file.write_text(ADMIN_KEY)
    process = ServerProcess(
        "--address=127.0.0.1:0",
        f"--database={directory / 'db'}",
        "--no-sync",
        f"--admin-key-file={admin_key_file}",
        f"--userinfo-url={UNREACHABLE_USERINFO}",
    )
    try:
        address = f"127.0.0.1:{process.wait_listening()}"
        data = build_burst()
        with Client(address) as client:
            load_burst(client, ADMIN_KEY, data)
        yield BurstPerfdb(address, data)
    finally:
        if process.process.poll() is None:
            process.process.send_signal(signal.SIGTERM)
            process.finish()


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
    log_file: Path


@contextlib.contextmanager
def dashboard_process(server: str, log_file: Path, *extra: str) -> Iterator[DashboardProcess]:
    """`python -m perfdb.web` (what the perfdb-web script runs) on a free port."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "perfdb.web", "--server", server, "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )
    try:
        deadline = time.monotonic() + 15
        url = None
        while url is None:
            text = log_file.read_text()
            if " listening on " in text:
                url = text.split(" listening on ", 1)[1].split()[0].rstrip("/")
            elif process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"perfdb-web did not start: {text}")
            else:
                time.sleep(0.05)
        yield DashboardProcess(url, log_file)
    except BaseException:
        process.kill()
        process.wait()
        raise
    # SIGTERM is how operators stop it: it must finish cleanly, having logged no traceback.
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    log_text = log_file.read_text()
    assert code == 0 and "Traceback" not in log_text, log_text[-2000:]
