"""The ``deltatune`` command: ``train``, ``eval``, ``merge``, ``show``, ``select``, ``serve`` and ``study``
(see docs/cli.md)."""

from __future__ import annotations

import argparse
import sys

import transformers

from ..assets import AssetError
from . import evaluate, merge, select, serve, show, study, train

COMMANDS = {"train": train, "eval": evaluate, "merge": merge, "show": show, "select": select, "serve": serve,
            "study": study}


class _ShowDefaults(argparse.HelpFormatter):
    """Every option with a value states its default, unless its help already does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltatune", description="Delta tuning for pre-trained PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0],
                                                 description=module.__doc__, formatter_class=_ShowDefaults))
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
