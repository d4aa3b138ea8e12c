"""The ``deltatune`` command: ``train``, ``eval``, ``show`` and ``select`` (see docs/cli.md)."""

from __future__ import annotations

import argparse
import sys

import transformers

from ..assets import AssetError
from . import evaluate, select, show, train

COMMANDS = {"train": train, "eval": evaluate, "show": show, "select": select}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltatune", description="Delta tuning for pre-trained PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0],
                                                 description=module.__doc__))
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # the command's own output stays readable
    transformers.utils.logging.set_verbosity_error()  # e.g. the load report of a new classification head
    try:
        COMMANDS[args.command].run(args)
        return 0
    except (ValueError, TypeError, OSError, TimeoutError, AssetError) as error:
        print(f"deltatune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; the state is saved: the same command with --resume continues" if args.command == "train" else ""
        print(f"deltatune {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
