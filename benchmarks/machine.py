"""What a result was measured on: the command, the CPU, the thread count and the versions that matter."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path


def machine(command: str, threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {p: metadata.version(p) for p in ("torch", "transformers", "peft", "deltatune")}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}
