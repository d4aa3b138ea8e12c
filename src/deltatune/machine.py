"""What a result was measured on: the date, the command, the CPU, the thread count and the versions that matter."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "deltatune")


def machine(command: str, threads: int) -> dict[str, Any]:
    """A record of the machine and the installed versions of :data:`PACKAGES` (those installed)."""
    info = Path("/proc/cpuinfo")
    cpu = platform.processor()
    if info.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}
