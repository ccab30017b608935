import asyncio

import pytest
import uvloop

from tests.conftest import ASYNC_TEST_DEADLINE, harness_deadline


async def test_async_tests_run_on_both_loops(loop_kind: str) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop) == (loop_kind == "uvloop")


async def test_an_async_test_has_the_harness_deadline(request: pytest.FixtureRequest) -> None:
    assert harness_deadline(request.node) == ASYNC_TEST_DEADLINE


@pytest.mark.timeout(ASYNC_TEST_DEADLINE * 2)
async def test_a_test_with_a_timeout_of_its_own_has_no_other_deadline(request: pytest.FixtureRequest) -> None:
    # pytest-timeout's clock alone, so a test bounded by work (the fuzz tests) may use all of it.
    assert harness_deadline(request.node) is None
