"""`python -m sbir_core`: the command line, one subcommand per capability.

This package owns the whole command line, one module per group of subcommands (search:
index and search; evaluate; training; explain: explain and map; galleries; serve), each
with its arguments (`add`), handlers (read the arguments, call the library, print) and
printing; `common` holds what they share. Here: the parser and how failures are reported.
The library modules hold no argparse code and print nothing.

Building the parser must stay cheap (`--help` answers at once): handlers import the
library inside the function body, and the few library constants the parser needs
(choices, defaults, help text) are mirrored in `common`; tests/test_cli.py checks that the
mirrors match the originals and that building the parser loads no torch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from sbir_core.cli import correspondence, evaluate, explain, galleries, search, serve, training
from sbir_core.cli.common import LITE_BACKBONES, CLIError
from sbir_core.cli.evaluate import format_eval_report
from sbir_core.cli.search import format_build_report, format_results_table, format_search_settings
from sbir_core.errors import SBIRError

__all__ = ["CLIError", "LITE_BACKBONES", "build_parser", "format_build_report", "format_eval_report",
           "format_results_table", "format_search_settings", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbir" if Path(sys.argv[0]).name == "sbir" else "python -m sbir_core",
        description="Zero-shot sketch-based image retrieval: index, search, evaluate, train, explain.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    # In the order they appear in --help.
    for module in (search, evaluate, training, correspondence, explain, galleries, serve):
        module.add(sub)
    return parser


# Exit codes: 0 done, 2 a problem the user can fix (one `error:` line), anything else a
# bug (Python's traceback, exit code 1).
EXIT_USER_ERROR = 2


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (SBIRError, CLIError, FileNotFoundError) as exc:
        # The library's own errors (bad input, missing or stale gallery, wrong split ...)
        # and missing files; a ValueError or KeyError from anywhere else is a bug and keeps
        # its traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
