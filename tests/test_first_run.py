"""./run_perf_db_server.py from a fresh checkout, run by an interpreter that lacks perfdb's
dependencies: it moves to the checkout's .venv when there is one, else says what to run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from perfdb import __version__
from tests.support import REPO_ROOT, ServerProcess, Spawn

ERROR_PREFIX = "run_perf_db_server: error: "
# Two real interpreters without the dependencies: this one with site-packages turned off, and
# the base Python the test virtualenv was made from, isolated from the environment.
BASE_PYTHON = Path(sys.base_prefix) / "bin" / "python3"
BARE_INTERPRETERS = {
    "no_site": (sys.executable, "-S"),
    "base_isolated": (str(BASE_PYTHON), "-I"),
}
bare_interpreters = pytest.mark.parametrize("interpreter", list(BARE_INTERPRETERS))


def fresh_checkout(tmp_path: Path) -> Path:
    """The script and the package as a clone has them, with no .venv yet."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(REPO_ROOT / "run_perf_db_server.py", checkout)
    shutil.copy(REPO_ROOT / "setup.cfg", checkout)
    (checkout / "perfdb").symlink_to(REPO_ROOT / "perfdb", target_is_directory=True)
    return checkout


def make_venv(checkout: Path, *, with_dependencies: bool) -> Path:
    """A real virtualenv at checkout/.venv; with dependencies, it sees this test run's packages."""
    venv = checkout / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    if with_dependencies:
        python = venv / "bin" / "python"
        site_packages = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        Path(site_packages, "perfdb-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def start_bare(spawn: Spawn, interpreter: str, checkout: Path, *args: str) -> ServerProcess:
    """The checkout's script run by a bare interpreter, with nothing of this environment but PATH."""
    command = BARE_INTERPRETERS[interpreter]
    if not Path(command[0]).exists():
        pytest.skip(f"no base interpreter at {command[0]}")
    return spawn(
        *args,
        command=(*command, str(checkout / "run_perf_db_server.py")),
        cwd=checkout,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"},
    )


def run_bare(spawn: Spawn, interpreter: str, checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """start_bare, run to its end."""
    process = start_bare(spawn, interpreter, checkout, *args)
    code, stderr = process.wait_exit(timeout=60)
    return subprocess.CompletedProcess(process.command, code, process.stdout.decode(errors="replace"), stderr)


@bare_interpreters
def test_the_interpreters_really_lack_the_dependencies(interpreter: str, tmp_path: Path) -> None:
    command = BARE_INTERPRETERS[interpreter]
    if not Path(command[0]).exists():
        pytest.skip(f"no base interpreter at {command[0]}")
    result = subprocess.run(
        [*command, "-c", "import aiohttp"], env={}, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "No module named 'aiohttp'" in result.stderr


@bare_interpreters
def test_without_a_venv_one_line_says_what_to_run(spawn: Spawn, interpreter: str, tmp_path: Path) -> None:
    checkout = fresh_checkout(tmp_path)
    result = run_bare(spawn, interpreter, checkout, "--database", str(tmp_path / "db"))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    # The first of setup.cfg's install_requires the interpreter lacks: any of them.
    assert any(f"lacks the Python module {name!r};" in lines[0] for name in ("plyvel", "aiohttp", "orjson")), lines[0]
    assert "make run" in lines[0]
    assert "pip install -e ." in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "db").exists()


@bare_interpreters
def test_with_the_checkout_venv_it_runs_under_it(spawn: Spawn, interpreter: str, tmp_path: Path) -> None:
    checkout = fresh_checkout(tmp_path)
    make_venv(checkout, with_dependencies=True)
    result = run_bare(spawn, interpreter, checkout, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"perfdb {__version__}"


def test_with_the_checkout_venv_the_server_serves_and_stops_on_sigterm(spawn: Spawn, tmp_path: Path) -> None:
    """The re-exec keeps the process: its pid is the one the operator signals."""
    checkout = fresh_checkout(tmp_path)
    make_venv(checkout, with_dependencies=True)
    server = start_bare(
        spawn, "no_site", checkout, "--address=127.0.0.1:0", f"--database={tmp_path / 'db'}", "--userinfo-url=none"
    )
    server.wait_listening(timeout=30)
    assert (tmp_path / "db" / "CURRENT").is_file()
    code, stderr = server.stop(signal.SIGTERM, timeout=30)
    assert code == 0, stderr
    assert "shut down cleanly" in stderr


@bare_interpreters
def test_a_venv_without_the_dependencies_says_what_to_run_and_does_not_loop(
    spawn: Spawn, interpreter: str, tmp_path: Path
) -> None:
    checkout = fresh_checkout(tmp_path)
    venv = make_venv(checkout, with_dependencies=False)
    result = run_bare(spawn, interpreter, checkout, "--version")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    # Said by the venv's interpreter, once: the script moved there and stopped.
    assert lines[0].startswith(f"{ERROR_PREFIX}{venv / 'bin' / 'python'} lacks "), lines[0]
    assert "make run" in lines[0]


def packages_without(tmp_path: Path, module: str) -> Path:
    """A directory holding every package of this test run but one: on an interpreter's path, the
    interpreter has perfdb's other dependencies (aiohttp, orjson, plyvel, ...) but not `module`."""
    packages = tmp_path / f"packages-without-{module}"
    packages.mkdir()
    site_packages = Path(sysconfig.get_paths()["purelib"])
    for entry in site_packages.iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() != module and not entry.name.endswith(".pth"):
            (packages / entry.name).symlink_to(entry)
    return packages


def start_without(spawn: Spawn, checkout: Path, packages: Path, *args: str) -> ServerProcess:
    """The checkout's script run by this interpreter with only `packages` for its dependencies."""
    return spawn(
        *args,
        command=(sys.executable, "-S", str(checkout / "run_perf_db_server.py")),
        cwd=checkout,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(packages), "PYTHONUNBUFFERED": "1"},
    )


# prometheus_client is imported as the server starts; scipy only when first used.
@pytest.mark.parametrize("module", ["prometheus_client", "scipy"])
def test_an_interpreter_lacking_one_dependency_says_which_without_a_venv(
    spawn: Spawn, tmp_path: Path, module: str
) -> None:
    checkout = fresh_checkout(tmp_path)
    packages = packages_without(tmp_path, module)
    probe = subprocess.run(
        [sys.executable, "-S", "-c", f"import aiohttp, orjson, plyvel\nimport {module}"],
        env={"PYTHONPATH": str(packages)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert f"No module named '{module}'" in probe.stderr  # the others are there
    process = start_without(spawn, checkout, packages, "--database", str(tmp_path / "db"))
    code, stderr = process.wait_exit(timeout=60)
    assert code == 1, stderr
    assert stderr.splitlines() == [
        f"{ERROR_PREFIX}{sys.executable} lacks the Python module {module!r}; "
        "run 'make run' (it builds .venv and starts the server), or 'pip install -e .' first"
    ]
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("module", ["prometheus_client", "scipy"])
def test_an_interpreter_lacking_one_dependency_moves_to_the_checkout_venv(
    spawn: Spawn, tmp_path: Path, module: str
) -> None:
    checkout = fresh_checkout(tmp_path)
    make_venv(checkout, with_dependencies=True)
    process = start_without(spawn, checkout, packages_without(tmp_path, module), "--version")
    code, stderr = process.wait_exit(timeout=60)
    assert code == 0, stderr
    assert process.stdout.decode().strip() == f"perfdb {__version__}"
