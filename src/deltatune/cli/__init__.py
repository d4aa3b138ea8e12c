"""The ``deltatune`` command: ``show`` and ``select`` (see docs/cli.md)."""

from __future__ import annotations

import argparse
import sys

import transformers

from . import select, show

COMMANDS = {"show": show, "select": select}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltatune", description="Delta tuning for pre-trained PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0],
                                                 description=module.__doc__))
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # the command's own output stays readable
    try:
        return COMMANDS[args.command].run(args) or 0
    except (ValueError, TypeError, FileNotFoundError, TimeoutError) as error:
        print(f"deltatune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
