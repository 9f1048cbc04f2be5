"""`python -m sbir_core`: one subcommand per capability.

Each concern module owns its subcommands through a `register_cli(subparsers)`
function, so the command line grows without one file becoming a hub of logic.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in the order they appear in --help.
CLI_MODULES = (
    "sbir_core.index",      # index, search
    "sbir_core.evaluate",   # eval
    "sbir_core.train",      # train
    "sbir_core.finetune",   # finetune
    "sbir_core.relation",   # train-relation
    "sbir_core.explain",    # explain, tsne
    "sbir_core.download",   # gallery download
)


class CLIError(Exception):
    """An error the command line reports as one clear line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sbir_core",
        description="Zero-shot sketch-based image retrieval: index, search, evaluate, train, explain.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a capability not built yet; others still work
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (CLIError, FileNotFoundError, ValueError, KeyError) as exc:
        # Known failure modes (bad path, wrong split, stale gallery...) get one line.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
