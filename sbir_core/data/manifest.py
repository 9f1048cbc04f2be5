"""A collection listed in a file instead of a folder tree: a manifest, CSV or Parquet, with a
`path` and a `label` column, one picture a row. Relative paths resolve against the manifest's
folder. Both `index` engines read manifests here, so they see the same pictures."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Union

from sbir_core.errors import InputError

MANIFEST_SUFFIXES = (".csv", ".parquet")


def is_manifest(path: Union[str, Path]) -> bool:
    """A file whose name says it is a manifest (.csv or .parquet)."""
    p = Path(path)
    return p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file()


def read_manifest(path: Union[str, Path]) -> list[tuple[Path, str]]:
    """The manifest's rows as (absolute path, label), in the file's order. Paths are not
    checked here: a missing or unreadable picture is skipped and counted by the build."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        rows = _read_parquet(path)
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(f)
            _check_columns(path, reader.fieldnames or [])
            rows = [(r.get("path") or "", r.get("label") or "") for r in reader]
    else:
        raise InputError(f"{path.name} is not a manifest: use a .csv or .parquet file with path and label columns.")
    base = path.resolve().parent
    # normpath, not resolve: a linked file is listed where it was listed, as a folder scan lists it
    return [(Path(os.path.normpath(base / p.strip())), str(label).strip()) for p, label in rows]


def _check_columns(path: Path, names: list[str]) -> None:
    if "path" not in names:
        raise InputError(f"the manifest {path.name} has no “path” column (it has: {', '.join(names) or 'none'}).")


def _read_parquet(path: Path) -> list[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading a Parquet manifest needs pyarrow: pip install pyarrow "
                         "(or use a CSV manifest).") from None
    names = pq.read_schema(path).names
    _check_columns(path, names)
    table = pq.read_table(path, columns=[c for c in ("path", "label") if c in names])
    paths = [str(p or "") for p in table.column("path").to_pylist()]
    labels = [str(x or "") for x in table.column("label").to_pylist()] if "label" in names else [""] * len(paths)
    return list(zip(paths, labels))
