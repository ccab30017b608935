"""The deployment examples in contrib/: the systemd unit passes `systemd-analyze verify`, and the
server command lines they carry are ones the server accepts (so they cannot drift from --help)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perfdb.config import Config, config_from_args
from tests.support import REPO_ROOT

UNIT = REPO_ROOT / "contrib" / "perfdb.service"
DOCKERFILE = REPO_ROOT / "contrib" / "Dockerfile"
INSTALLED_SCRIPTS = "/opt/perfdb/bin/"


def unit_settings() -> dict[str, list[str]]:
    """Key -> values (a key may repeat), across the unit's sections."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    # As installed, but with this checkout's scripts where the unit expects /opt/perfdb's, since
    # verify checks that ExecStart's program exists.
    scripts = Path(sys.executable).parent
    assert (scripts / "run_perf_db_server").exists()
    unit = tmp_path / "perfdb.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_SCRIPTS, f"{scripts}/"))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    # verify only warns about unknown keys or bad values: any word about our unit is a failure.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "perfdb.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_systemd_unit_is_hardened_and_stops_after_the_server_can() -> None:
    settings = unit_settings()
    for key, value in {
        "DynamicUser": "yes",
        "StateDirectory": "perfdb",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        # SIGTERM to the server alone (it stops the dashboard itself); SIGKILL to whatever of the
        # control group, dashboard included, is left when TimeoutStopSec runs out.
        "KillMode": "mixed",
    }.items():
        assert settings.get(key) == [value], (key, settings.get(key))
    (stop_seconds,) = settings["TimeoutStopSec"]
    assert float(stop_seconds) > Config().shutdown_timeout


def test_systemd_unit_command_line_is_one_the_server_accepts() -> None:
    (exec_start,) = unit_settings()["ExecStart"]
    program, *arguments = shlex.split(exec_start)
    assert program == INSTALLED_SCRIPTS + "run_perf_db_server"
    config = config_from_args(arguments)
    assert config.web_address is not None
    assert str(config.database) == "%S/perfdb"  # systemd's state directory, StateDirectory=perfdb


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    instructions = []
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if line.strip():
            name, arguments = line.split(None, 1)
            instructions.append((name, arguments.strip()))
    return instructions


def test_dockerfile_runs_the_server_with_the_dashboard_as_a_user_on_a_volume() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    by_name: dict[str, list[str]] = {}
    for name, arguments in instructions:
        by_name.setdefault(name, []).append(arguments)
    (user,) = by_name["USER"]
    assert user not in ("root", "0")
    (volume,) = by_name["VOLUME"]
    for copied in by_name["COPY"]:
        *sources, _destination = copied.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file in the checkout"
    (entrypoint,) = by_name["ENTRYPOINT"]
    program, *arguments = json.loads(entrypoint)
    assert program == "run_perf_db_server"
    config = config_from_args(arguments)
    assert config.web_address is not None
    assert str(config.database) == volume
    # The health check asks the server itself, on the port its --metrics-address listens on.
    assert config.metrics_address is not None
    metrics_port = config.metrics_address.rsplit(":", 1)[1]
    (healthcheck,) = by_name["HEALTHCHECK"]
    assert f"'http://127.0.0.1:{metrics_port}/readyz'" in healthcheck
    (exposed,) = by_name["EXPOSE"]
    assert metrics_port in exposed.split()
