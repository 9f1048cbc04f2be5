"""Command-line flags generated from a settings dataclass, and a JSON recipe under them.

Each field becomes `--field-name` with its type, its help (the field's trailing comment, as
simple-parsing reads it: `field_help`) and its default (shown once, by argparse's
ArgumentDefaultsHelpFormatter); a bool becomes `--name` / `--no-name`, a tuple takes
several values. `settings_from` starts from the dataclass defaults, applies a recipe (a JSON
object of field names), then the flags actually given. A generator over `dataclasses.fields`
rather than tyro or simple-parsing (neither is installed): it plugs into the existing
argparse subcommands, and the command line needs no further dependency.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import tokenize
import typing
from pathlib import Path
from typing import Any, Optional

from sbir_core.errors import InputError

GIVEN = "_given_settings"  # the namespace attribute listing the fields set by a flag


def _record(cls: type) -> type:
    """`cls` (an argparse action) that also notes which field a flag set."""
    class Given(cls):  # type: ignore[misc, valid-type]
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Optional[str] = None) -> None:
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, GIVEN, getattr(namespace, GIVEN, set()) | {self.dest})
    return Given


_STORE, _BOOL = _record(argparse._StoreAction), _record(argparse.BooleanOptionalAction)
_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _kind(tp: Any) -> tuple[Any, bool]:
    """A field's type -> (element type, whether it is a tuple); Optional[X] is X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union:
        return _kind(args[0])
    if typing.get_origin(tp) is tuple:
        return args[0], True
    return tp, False


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once, by argparse; none for flags whose default is "not given"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its help: the comment after the field on its line, continued by the
    comment-only lines that follow it aligned under that comment."""
    source = inspect.getsource(cls)
    comments: dict[int, tuple[int, str]] = {}  # line -> (column, text) of its comment
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    out = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments:
            line = node.end_lineno
            col, text = comments[line]
            parts = [text]
            while line + 1 in comments and line + 1 not in code_lines and comments[line + 1][0] == col:
                line += 1
                parts.append(comments[line][1])
            out[node.target.id] = " ".join(parts)
    return out


def add_flags(parser: Any, cls: type, choices: Optional[dict[str, tuple]] = None) -> None:
    """One flag per field of the dataclass `cls` on `parser` (or an argument group);
    `choices`: allowed values by field name."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        tp, many = _kind(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": helps.get(f.name, "")}
        allowed = (choices or {}).get(f.name)
        if tp is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=_BOOL, **kw)
            continue
        if allowed:
            kw["choices"] = allowed
        if many:
            kw["nargs"] = "+"
        if not allowed:
            kw["metavar"] = _METAVARS.get(tp, "VALUE")
        parser.add_argument("--" + f.name.replace("_", "-"), action=_STORE, type=tp, **kw)


def settings_from(cls: type, args: argparse.Namespace, recipe: Optional[str] = None) -> Any:
    """`cls` from its defaults, then the JSON recipe file (field names as keys), then the
    flags given on the command line. Unknown recipe keys or values of the wrong type raise
    InputError; the dataclass checks the values themselves."""
    values: dict[str, Any] = {}
    if recipe:
        values = _read_recipe(cls, Path(recipe))
    values.update({name: getattr(args, name) for name in getattr(args, GIVEN, set())})
    hints = typing.get_type_hints(cls)
    for name, v in values.items():
        if _kind(hints[name])[1] and isinstance(v, list):
            values[name] = tuple(v)
    return cls(**values)


def _read_recipe(cls: type, path: Path) -> dict[str, Any]:
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read recipe {path}: {exc}") from None
    if not isinstance(recipe, dict):
        raise InputError(f"recipe {path} must be a JSON object of settings")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(recipe) - set(names))
    if unknown:
        raise InputError(f"recipe {path} has unknown setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
    for name, v in recipe.items():
        tp, many = _kind(hints[name])
        ok = (v is None and typing.get_origin(hints[name]) is typing.Union) or (
            isinstance(v, list) and all(_fits(x, tp) for x in v) if many else _fits(v, tp))
        if not ok:
            raise InputError(f"recipe {path}: {name} must be {'a list of ' if many else ''}{tp.__name__}, not {v!r}")
    return recipe


def _fits(v: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, tp) and (tp is bool or not isinstance(v, bool))
