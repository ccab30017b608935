#!/usr/bin/env python3
"""Run the perfdb server: ./run_perf_db_server.py --address=hostname:port --database=path

From a checkout this works with any python3: when the interpreter lacks perfdb's dependencies
and `make run` has built .venv beside this script, the script runs itself again under
.venv/bin/python; without a .venv it says in one line what to run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent
CHECKOUT_VENV = CHECKOUT / ".venv"
# What the server cannot start without (uvloop is optional: the server falls back to asyncio).
REQUIRED_MODULES = ("aiohttp", "orjson", "plyvel")
MINIMUM_PYTHON = (3, 11)


def missing_requirement() -> str | None:
    """What this interpreter lacks to run perfdb, or None."""
    if sys.version_info < MINIMUM_PYTHON:
        return "Python {}.{} or newer".format(*MINIMUM_PYTHON)
    for name in REQUIRED_MODULES:
        if importlib.util.find_spec(name) is None:
            return f"the Python module {name!r}"
    return None


def running_in_checkout_venv() -> bool:
    return Path(sys.prefix).resolve() == CHECKOUT_VENV.resolve()


def run() -> int:
    missing = missing_requirement()
    if missing is not None:
        venv_python = CHECKOUT_VENV / "bin" / "python"
        if venv_python.exists() and not running_in_checkout_venv():
            # Replaces this process: same pid, arguments, working directory and environment.
            os.execv(venv_python, [str(venv_python), str(CHECKOUT / Path(__file__).name), *sys.argv[1:]])
        print(
            f"run_perf_db_server: error: {sys.executable} lacks {missing}; "
            "run 'make run' (it builds .venv and starts the server), or 'pip install -e .' first",
            file=sys.stderr,
        )
        return 1
    from perfdb.server import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
