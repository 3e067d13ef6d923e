"""`adaroute` command line: one job per command.

Each command lives in its own module exposing `add_parser(subparsers)` and `run(args) -> int`;
modules import torch and the model code inside `run`, so argument errors and `--version` answer
in well under a second. Bad input raises `AdarouteError`; `main` prints its one line and exits with
code 2 (no traceback unless `--debug`). Exit codes: 0 success, 2 bad input (arguments, files,
models), 1 an internal error (one line asking for a report), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from adaroute import __version__
from adaroute.errors import AdarouteError

COMMANDS = ("demo", "convert", "eval", "generate", "bench", "serve", "audit", "report", "rollout")
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (argparse prints the usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"adaroute: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="adaroute", description="Input-adaptive sparse routing for Transformers.")
    parser.add_argument("--version", action="version", version=f"adaroute {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"adaroute.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (one line, code 2), --help and --version (code 0)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("adaroute: interrupted; outputs are written whole or not at all", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        code, line = describe_error(e)
        print(f"adaroute: error: {line}", file=sys.stderr)
        return code


def describe_error(e: Exception) -> tuple[int, str]:
    """(exit code, one line) for an exception that reached the top."""
    if isinstance(e, AdarouteError):
        return EXIT_BAD_INPUT, str(e)
    if isinstance(e, OSError):  # the file system said no (full disk, permissions, a path too long)
        where = f"{e.filename}: " if e.filename else ""
        return EXIT_BAD_INPUT, f"{where}{e.strerror or e}; check the path, free space and permissions"
    if isinstance(e, MemoryError):
        return EXIT_BAD_INPUT, "out of memory: use a smaller --batch, --window or model"
    first = (str(e).strip().splitlines() or [""])[0]
    return EXIT_INTERNAL, f"internal error ({type(e).__name__}: {first}); rerun with --debug and report it"
