import asyncio

import uvloop


async def test_async_tests_run_on_both_loops(loop_kind: str) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop) == (loop_kind == "uvloop")
