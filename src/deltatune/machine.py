"""What a result was measured on: the date, the command, the CPU, the thread count and the versions that matter."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "deltatune")


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_and_versions() -> str:
    """One line naming what a result depends on: the CPU, torch and transformers (what a study cell records)."""
    return f"{cpu_name()}, torch {metadata.version('torch')}, transformers {metadata.version('transformers')}"


def machine(command: str, threads: int) -> dict[str, Any]:
    """A record of the machine and the installed versions of :data:`PACKAGES` (those installed)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}
