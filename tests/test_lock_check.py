"""tools/lock-check.py: an environment with a package the lock does not pin, or pins otherwise, is refused."""

import runpy
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "lock-check.py"
NOT_LOCKED = runpy.run_path(str(TOOL))["NOT_LOCKED"]


def _installed() -> dict[str, str]:
    return {d.metadata["Name"]: d.version.removesuffix("+cpu") for d in distributions()
            if d.metadata["Name"] not in NOT_LOCKED}


def _check(tmp_path, pins: dict[str, str]) -> subprocess.CompletedProcess:
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\n" + "".join(f"{name}=={version}\n" for name, version in pins.items()))
    return subprocess.run([sys.executable, str(TOOL), str(lock)], capture_output=True, text=True)


def test_an_environment_that_is_its_lock_passes(tmp_path):
    result = _check(tmp_path, _installed())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_a_package_the_lock_does_not_pin_is_named(tmp_path):
    pins = _installed()
    version = pins.pop("safetensors")
    result = _check(tmp_path, pins)
    assert result.returncode == 1
    assert f"safetensors {version} is installed but not in the lock" in result.stderr
    assert "make clean" in result.stderr and "make lock" in result.stderr


def test_a_package_at_another_version_is_named(tmp_path):
    pins = _installed()
    installed, pins["rich"] = pins["rich"], "0.0.1"
    result = _check(tmp_path, pins)
    assert result.returncode == 1
    assert f"rich {installed} is installed but the lock pins 0.0.1" in result.stderr
