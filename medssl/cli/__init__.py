"""The ``medssl`` command.

Thin by design: each ``medssl/cli/*_cmd.py`` module exposes ``register(subparsers)`` that adds its
sub-commands, each with ``set_defaults(func=...)`` taking the parsed ``argparse.Namespace`` and returning
an exit code. Modules are discovered automatically, so adding a command never touches this file.

Errors: a :class:`medssl.errors.MedsslError` (bad input) prints one line ``medssl: error: ...`` and exits
with status 2; any other exception does the same with its type name. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from medssl import __version__
from medssl.errors import MedsslError


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every discovered sub-command."""
    parser = argparse.ArgumentParser(
        prog="medssl",
        description="Second-stage self-supervised pretraining and evaluation for medical imaging.",
    )
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.endswith("_cmd"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medssl`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MedsslError as exc:
        if args.debug:
            raise
        print(f"medssl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medssl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users, traceback with --debug
        if args.debug:
            raise
        print(f"medssl: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
