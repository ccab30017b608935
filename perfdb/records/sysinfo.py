"""What `perfdb submit --sys-info auto` reports about this machine: hardware and software,
never host names or network addresses."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _first_value(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text(errors="replace").splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def collect_sys_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": _first_value("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "architecture": platform.machine(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    memory = _first_value("/proc/meminfo", "MemTotal")
    if memory and memory.endswith("kB") and memory[:-2].strip().isdigit():
        info["memory_bytes"] = int(memory[:-2]) * 1024
    return info
