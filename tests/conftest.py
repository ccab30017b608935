"""Test harness: every async test runs once on asyncio and once on uvloop, with a deadline,
and fails if the event loop reports an exception nobody handled."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.support import PERFDB_SERVER, ServerProcess, Spawn

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
ASYNC_TEST_DEADLINE = 45.0  # unless the test names its own @pytest.mark.timeout
# A --long run multiplies the rounds of the reliability tests (fuzz inputs 13x, say), and the
# timeouts they name with them.
LONG_RUN_TIMEOUT_FACTOR = 20


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the reliability suite with many more rounds (minutes, not seconds)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--long"):
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and marker.args:
            item.add_marker(pytest.mark.timeout(float(marker.args[0]) * LONG_RUN_TIMEOUT_FACTOR), append=False)


def harness_deadline(item: pytest.Item) -> float | None:
    """The async harness's deadline: none for a test with a timeout of its own (pytest-timeout's
    is then the only clock), else ASYNC_TEST_DEADLINE."""
    return None if item.get_closest_marker("timeout") is not None else ASYNC_TEST_DEADLINE


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under --long: reliability tests scale their rounds up."""
    return bool(request.config.getoption("--long"))


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts ServerProcesses (tests/support.py), perfdb unless told another command; each is
    killed at the end of the test if it is still running."""
    with contextlib.ExitStack() as started:

        def start(
            *args: str,
            command: Sequence[str] = PERFDB_SERVER,
            cwd: Path | None = None,
            env: Mapping[str, str] | None = None,
        ) -> ServerProcess:
            return started.enter_context(ServerProcess(*args, command=command, cwd=cwd, env=env))

        yield start


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if inspect.iscoroutinefunction(metafunc.function):
        metafunc.fixturenames.append("loop_kind")
        metafunc.parametrize("loop_kind", list(LOOP_FACTORIES))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kind = str(pyfuncitem.callspec.params["loop_kind"])
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    unhandled: list[dict[str, Any]] = []
    deadline = harness_deadline(pyfuncitem)

    async def run_test() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unhandled.append(context))
        async with asyncio.timeout(deadline):
            await pyfuncitem.obj(**arguments)

    with asyncio.Runner(loop_factory=LOOP_FACTORIES[kind]) as runner:
        runner.run(run_test())
    if unhandled:
        pytest.fail(f"the event loop reported unhandled errors: {unhandled}")
    return True
