"""`adaroute` command line: one job per command.

Each command lives in its own module exposing `add_parser(subparsers)` and `run(args) -> int`.
Bad input raises `AdarouteError`; `main` prints its one line and exits with code 2 (no traceback
unless `--debug`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from adaroute.errors import AdarouteError

COMMANDS = ("demo", "convert", "eval", "generate", "bench")
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaroute", description="Input-adaptive sparse routing for Transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"adaroute.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AdarouteError as e:
        if args.debug:
            raise
        print(f"adaroute: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("adaroute: interrupted", file=sys.stderr)
        return 130
