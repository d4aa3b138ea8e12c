"""Fail when this environment holds a package the lock does not pin, or pins at another version.

`pip install -c LOCK` pins only what the lock names: a dependency that a new release of a locked package starts to
require is installed at whatever version the index has that day. Run with the environment's own interpreter:

    .venv/bin/python tools/lock-check.py requirements/lock.txt
"""

import sys
from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name

# the project itself and the installer's own tools, which a venv brings
NOT_LOCKED = {"deltatune", "pip", "setuptools", "wheel"}


def pinned(lock_path: str) -> dict[str, str]:
    pins = {}
    for line in Path(lock_path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def main(lock_path: str) -> int:
    pins = pinned(lock_path)
    wrong = []
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        version = dist.version.removesuffix("+cpu")
        if name in NOT_LOCKED:
            continue
        if name not in pins:
            wrong.append(f"{name} {version} is installed but not in the lock")
        elif pins[name] != version:
            wrong.append(f"{name} {version} is installed but the lock pins {pins[name]}")
    for line in sorted(wrong):
        print(f"{lock_path}: {line}", file=sys.stderr)
    if wrong:
        print("A package installed by hand: rebuild the environment from the lock (`make clean`, then `make test`). "
              "A dependency's new requirement: refresh the lock (`make lock`, docs/compatibility.md).", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
