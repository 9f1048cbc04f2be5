"""Datasets: image folders, QuickDraw stroke files, and the benchmark splits.

Everything is an `Item` (one photo or one sketch with its class). Benchmark splits
come from `splits.json` (see the data folder's README); their exclusion lists are
enforced here, in code, so training can never see an excluded class by mistake.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from sbir_core.data.strokes import read_strokes
from sbir_core.errors import InputError, SBIRError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS_FILE = "splits.json"
# The last HELDOUT_DOODLES doodles (of the 25 per class in the shared data) of every
# QuickDraw class are never trained on: the product benchmark searches galleries with
# them, so even classes the model trained on are measured on unseen drawings.
HELDOUT_DOODLES = 5


@dataclass
class Item:
    """One photo or sketch. Sketches from QuickDraw carry their strokes instead of a path."""

    label: str
    modality: str  # "photo" | "sketch"
    path: Optional[str] = None
    strokes: Optional[list] = field(default=None, repr=False)
    source: str = ""  # dataset it came from: caltech101, pacs, quickdraw, folder
    key: str = ""  # stable unique id (path, or file#key_id for strokes)

    def load(self) -> Union[Image.Image, list]:
        """The raw input: a PIL image, or the stroke list (render with preprocess_sketch)."""
        if self.strokes is not None:
            return self.strokes
        with Image.open(self.path) as im:
            im.load()
            return im


class ExcludedClassError(SBIRError):
    """A class that a benchmark split reserves for testing reached training data."""


class UnknownSplitError(InputError):
    pass


# ----------------------------------------------------------------------------- readers
def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def image_folder(root: Union[str, Path], modality: str = "photo", source: str = "folder") -> list[Item]:
    """Images under `root`, recursively; the class is the first-level subfolder's name.

    Files directly in `root` get no class (label ""). Only the extension is checked
    here; unreadable files are handled (skipped and counted) by whoever decodes them.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    items = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and is_image_file(p):
            rel = p.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else ""
            items.append(Item(label=label, modality=modality, path=str(p), source=source, key=str(p)))
    return items


def read_ndjson(path: Union[str, Path]) -> list[Item]:
    """One QuickDraw `.ndjson` file -> sketch items with strokes (class = `word`), read as
    QuickDraw's [[xs], [ys]] into (n, 2) point arrays.

    An item's `key` ends in `#<line index>` so hold-outs by position are checkable."""
    path = Path(path)
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                # QuickDraw's form said, not detected: a doodle of 2-point strokes only is valid
                word, drawing = rec["word"], read_strokes(rec["drawing"], "quickdraw")
            except (json.JSONDecodeError, KeyError, InputError) as exc:
                log.warning("skipping line %d of %s: %s", n + 1, path, exc)
                continue
            key = f"{path}#{n}"
            items.append(Item(label=word, modality="sketch", strokes=drawing, source="quickdraw", key=key))
    return items


def quickdraw_folder(root: Union[str, Path], classes: Optional[Iterable[str]] = None) -> list[Item]:
    """All `.ndjson` files in `root` (optionally only some classes, by file stem or word)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    wanted = set(classes) if classes is not None else None
    items = []
    for p in sorted(root.glob("*.ndjson")):
        if wanted is not None and p.stem not in wanted:
            continue
        items.extend(it for it in read_ndjson(p) if wanted is None or it.label in wanted)
    return items


def folder_items(root: Union[str, Path], modality: str) -> list[Item]:
    """A folder of class subfolders (images) or of `.ndjson` files (strokes)."""
    root = Path(root)
    if root.is_dir() and any(root.glob("*.ndjson")):
        return quickdraw_folder(root)
    return image_folder(root, modality=modality)


# ----------------------------------------------------------------------------- splits
DATA_ENV = "SBIR_DATA"
DATA_HELP = "the shared data folder holding splits.json (default: $SBIR_DATA, else ../shared/data)"
# ../shared/data beside this checkout (absolute, as the scripts always named it, so cached
# features keyed by item paths stay valid), then beside the working folder.
_DEFAULT_ROOTS = (Path(__file__).resolve().parents[2].parent / "shared" / "data", Path("..") / "shared" / "data")


def data_root(arg: Union[str, Path, None] = None) -> Path:
    """The shared data folder (the one holding splits.json), found in one place for every
    command, script and test: `arg` (a --data argument), else $SBIR_DATA, else ../shared/data
    beside the checkout or the working folder. Raises InputError naming all three if none holds it."""
    env = os.environ.get(DATA_ENV)
    if arg:
        tried = [("--data", Path(arg))]
    elif env:
        tried = [(f"${DATA_ENV}", Path(env))]
    else:
        tried = [("../shared/data", p) for p in _DEFAULT_ROOTS]
    for _, path in tried:
        if (path / SPLITS_FILE).is_file():
            return path
    where = ", ".join(f"{how} = {path}" for how, path in tried)
    raise InputError(f"no shared data folder ({SPLITS_FILE} not found at {where}): pass --data DIR, "
                     f"set ${DATA_ENV}, or put the data at ../shared/data beside the checkout")


def load_splits(data_root: Union[str, Path]) -> dict:
    path = Path(data_root) / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SPLITS_FILE} in {data_root}: is --data the shared data folder?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def split_names(splits: dict) -> list[str]:
    return sorted(k for k, v in splits.items() if isinstance(v, dict) and "unseen_classes" in v)


def get_split(splits: dict, name: str) -> dict:
    names = split_names(splits)
    if name not in names:
        raise UnknownSplitError(f"unknown split {name!r}; splits.json defines: {', '.join(names)}")
    return splits[name]


def caltech_class(folder: str, splits: dict) -> str:
    """Caltech folder -> canonical class name: the QuickDraw class it maps to, if any."""
    mapped = splits.get("caltech101_to_quickdraw", {}).get(folder)
    return mapped if mapped else folder.replace("_", " ").lower()


def benchmark(data_root: Union[str, Path], split: str) -> tuple[list[Item], list[Item]]:
    """(queries, gallery) of a zero-shot benchmark split."""
    data_root = Path(data_root)
    splits = load_splits(data_root)
    spec = get_split(splits, split)
    unseen = set(spec["unseen_classes"])
    if split == "pacs":
        q = image_folder(data_root / "pacs" / "sketch", modality="sketch", source="pacs")
        g = image_folder(data_root / "pacs" / "photo", modality="photo", source="pacs")
        return [i for i in q if i.label in unseen], [i for i in g if i.label in unseen]
    # Doodle-style splits: QuickDraw queries, Caltech photos of the folders mapping to the classes.
    q = quickdraw_folder(data_root / "quickdraw", classes=unseen)
    g = []
    for it in image_folder(data_root / "caltech101", modality="photo", source="caltech101"):
        cls = splits.get("caltech101_to_quickdraw", {}).get(it.label)
        if cls in unseen:
            g.append(Item(label=cls, modality="photo", path=it.path, source="caltech101", key=it.key))
    return q, g


def excluded_names(splits: dict, exclude: Sequence[str]) -> dict[str, set[str]]:
    """Per source, the class names no training side may use; 'text' covers class-name text."""
    out: dict[str, set[str]] = {"quickdraw": set(), "caltech101": set(), "text": set()}
    for name in exclude:
        spec = get_split(splits, name)
        for src, classes in spec.get("exclude_from_training", {}).items():
            out.setdefault(src, set()).update(classes)
        out["text"].update(c.lower() for c in spec["unseen_classes"])
    # Text of every excluded class, however it is spelled in either source.
    out["text"].update(c.lower() for c in out["quickdraw"])
    out["text"].update(caltech_class(c, splits).lower() for c in out["caltech101"])
    out["text"].update(c.replace("_", " ").lower() for c in out["caltech101"])
    return out


def split_doodles(items: Sequence[Item], n_heldout: int = HELDOUT_DOODLES) -> tuple[list[Item], list[Item]]:
    """(trainable, held out): the last `n_heldout` doodles of each class are held out.
    Classes with no more than `n_heldout` doodles (tiny test sets) are all trainable."""
    by: dict[str, list[Item]] = {}
    for it in items:
        by.setdefault(it.label, []).append(it)
    train, held = [], []
    for label in sorted(by):
        group = by[label]
        cut = len(group) - n_heldout if len(group) > n_heldout else len(group)
        train.extend(group[:cut])
        held.extend(group[cut:])
    return train, held


def heldout_doodles(data_root: Union[str, Path], classes: Optional[Iterable[str]] = None) -> list[Item]:
    """Doodles no training run may use (the product benchmark's queries)."""
    return split_doodles(quickdraw_folder(Path(data_root) / "quickdraw", classes=classes))[1]


def training_items(
    data_root: Union[str, Path],
    exclude: Sequence[str] = ("pacs", "doodle"),
    max_photos_per_class: Optional[int] = None,
    hold_out_doodles: bool = True,
) -> list[Item]:
    """Caltech photos and QuickDraw doodles of every class not reserved by `exclude`.

    Labels are canonical class names (Caltech folders mapped to their QuickDraw
    class), so photo and sketch classes that are the same object share a label.
    `max_photos_per_class` keeps an evenly spaced subset of large Caltech classes
    (airplanes and motorbikes have 800 photos, most classes under 100): it balances
    classes and saves feature extraction time.
    """
    data_root = Path(data_root)
    splits = load_splits(data_root)
    ex = excluded_names(splits, exclude)
    items = []
    for it in image_folder(data_root / "caltech101", modality="photo", source="caltech101"):
        if it.label in ex["caltech101"]:
            continue
        cls = caltech_class(it.label, splits)
        items.append(Item(label=cls, modality="photo", path=it.path, source="caltech101", key=it.key))
    if max_photos_per_class:
        items = _cap_per_class(items, max_photos_per_class)
    for p in sorted((data_root / "quickdraw").glob("*.ndjson")):
        if p.stem in ex["quickdraw"]:
            continue
        doodles = read_ndjson(p)
        items.extend(split_doodles(doodles)[0] if hold_out_doodles else doodles)
    items = [it for it in items if it.label.lower() not in ex["text"]]
    assert_no_excluded(items, data_root, exclude)
    if hold_out_doodles:
        assert_no_heldout(items, data_root)
    return items


def assert_no_heldout(items: Iterable[Item], data_root: Union[str, Path]) -> None:
    """Raise ExcludedClassError if a held-out doodle reached training data."""
    held = {it.key for it in heldout_doodles(data_root)}
    leaked = [it.key for it in items if it.key in held]
    if leaked:
        raise ExcludedClassError(f"{len(leaked)} held-out doodles reached training data, e.g. {leaked[0]}")


def _cap_per_class(items: list[Item], n: int) -> list[Item]:
    by: dict[str, list[Item]] = {}
    for it in items:
        by.setdefault(it.label, []).append(it)
    out = []
    for label in sorted(by):
        group = by[label]
        if len(group) > n:
            idx = np.linspace(0, len(group) - 1, n).round().astype(int)
            group = [group[i] for i in idx]
        out.extend(group)
    return out


def assert_no_excluded(items: Iterable[Item], data_root: Union[str, Path], exclude: Sequence[str]) -> None:
    """Raise ExcludedClassError if any item's class or source folder is reserved."""
    splits = load_splits(data_root)
    ex = excluded_names(splits, exclude)
    for it in items:
        folder = Path(it.path).parent.name if it.path and it.source == "caltech101" else None
        if it.label.lower() in ex["text"] or (folder and folder in ex["caltech101"]):
            raise ExcludedClassError(f"class {it.label!r} ({it.key}) is reserved for testing by {list(exclude)}")


def assert_texts_allowed(class_names: Iterable[str], data_root: Union[str, Path], exclude: Sequence[str]) -> None:
    """Class-name text used in training losses must not name a reserved class."""
    ex = excluded_names(load_splits(data_root), exclude)["text"]
    bad = sorted({c for c in class_names if c.lower() in ex})
    if bad:
        raise ExcludedClassError(f"class-name text {bad} is reserved for testing by {list(exclude)}")


def fingerprint(items: Sequence[Item]) -> str:
    """Identifies a data selection: keys and labels, order-independent."""
    h = hashlib.sha256()
    for k in sorted(f"{it.key}\t{it.label}\t{it.modality}" for it in items):
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
