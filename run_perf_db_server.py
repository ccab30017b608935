#!/usr/bin/env python3
"""Run the perfdb server: ./run_perf_db_server.py --address=hostname:port --database=path

From a checkout this works with any python3: when the interpreter lacks perfdb's dependencies
and `make run` has built .venv beside this script, the script runs itself again under
.venv/bin/python; without a .venv it says in one line what to run.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent
CHECKOUT_VENV = CHECKOUT / ".venv"
MINIMUM_PYTHON = (3, 11)
# Listed in install_requires, but the server does without it (it falls back to asyncio).
OPTIONAL_MODULES = frozenset({"uvloop"})


def required_modules() -> list[str]:
    """The modules of setup.cfg's install_requires beside this script (none if it is not there):
    the dependencies perfdb imports only when first used (scipy, say) are checked here too."""
    setup_cfg = configparser.ConfigParser()
    if not setup_cfg.read(CHECKOUT / "setup.cfg"):
        return []
    requirements = setup_cfg.get("options", "install_requires", fallback="").split("\n")
    # "prometheus-client>=0.20" -> prometheus_client: each of these imports as its name.
    names = (re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0] for requirement in requirements)
    return [name.replace("-", "_").lower() for name in names if name and name not in OPTIONAL_MODULES]


def missing_requirement() -> str | None:
    """What this interpreter lacks to run perfdb, or None. Then importing the server finds
    whatever else it imports at start-up missing here, rather than in a traceback later."""
    if sys.version_info < MINIMUM_PYTHON:
        return "Python {}.{} or newer".format(*MINIMUM_PYTHON)
    for name in required_modules():
        if importlib.util.find_spec(name) is None:
            return f"the Python module {name!r}"
    try:
        import perfdb.server  # noqa: F401
    except ImportError as exc:  # a module missing, or one that cannot load here
        top_level = (exc.name or "").split(".")[0]
        if top_level in ("", "perfdb"):
            raise  # perfdb's own module missing is a broken checkout, not a missing dependency
        return f"the Python module {top_level!r}"
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
