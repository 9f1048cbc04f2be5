"""`serve`: the browser app of a source checkout."""
from __future__ import annotations

import argparse
from typing import Any

from sbir_core.cli import common


def _cmd_serve(args: argparse.Namespace) -> int:
    """Start the browser app (app.py of the source checkout; `serve -- --help` lists its options)."""
    import runpy

    from sbir_core.paths import PACKAGE_DIR

    app = PACKAGE_DIR.parent / "app.py"
    if not app.is_file():
        raise common.CLIError(f"the browser app (app.py) is not next to this installation ({app}); "
                              "run it from a source checkout: python app.py")
    module = runpy.run_path(str(app), run_name="sbir_app_main")  # not "sbir_app": that is the page package
    return int(module["main"]([a for a in args.app_args if a != "--"]) or 0)


def add(sub: Any) -> None:
    p = sub.add_parser("serve", help="start the browser app (the page you draw on)",
                       description="Start the Gradio app; arguments after -- go to it (e.g. -- --port 7861).")
    p.add_argument("app_args", nargs=argparse.REMAINDER, help="options of app.py (see: serve -- --help)")
    p.set_defaults(func=_cmd_serve)
