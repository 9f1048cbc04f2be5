"""Where things live: package data, the shipped checkpoints, and one data root.

Everything sbir_core writes (feature caches, the app's thumbnails, visitors' uploaded
galleries, galleries built with `Gallery.build`) goes under one root, `$SBIR_HOME`
(default `~/.cache/sbir`). Checkpoints are found by name, like `clip.load("ViT-B/32")`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from sbir_core.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]  # what every path argument in the library accepts

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIGS_DIR = PACKAGE_DIR / "model_configs"
EXAMPLES_DIR = PACKAGE_DIR / "examples"

# Named checkpoints shipped with the project.
CHECKPOINTS = {
    "default": "default.safetensors",     # the retrieval model (fine-tuned encoder + heads)
    "relation": "relation.safetensors",   # the cross-attention relation network (explanations)
    "correspondence": "correspondence.safetensors",  # the dense correspondence head (explanation lines)
}


def home() -> Path:
    """The one data root: $SBIR_HOME, default ~/.cache/sbir."""
    return Path(os.environ.get("SBIR_HOME") or Path.home() / ".cache" / "sbir").expanduser()


def cache_dir() -> Path:
    return home() / "cache"


def galleries_dir() -> Path:
    return home() / "galleries"


# The shipped checkpoints: `checkpoints/` of a source checkout, which an installed package
# carries as its package data `sbir_core/checkpoints/` (pyproject.toml maps the one folder
# to the other, so the files exist once in git and are found wherever pip puts the package:
# a prefix, --user, --target or a venv).
SHIPPED_CHECKPOINT_DIRS = (PACKAGE_DIR.parent / "checkpoints", PACKAGE_DIR / "checkpoints")
# A checkpoint over 10 MB is stored as shards under 10 MB (a Hugging Face Space refuses
# larger files in plain git), named as Hugging Face names them: default.safetensors ->
# default-00001-of-00002.safetensors, ... and the index default.safetensors.index.json.
INDEX_SUFFIX = ".index.json"
_SHARD = re.compile(r"(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors")


def checkpoint_dirs() -> list[Path]:
    """Where named checkpoints are looked for, in order: $SBIR_CHECKPOINTS, the shipped
    folders (a checkout's `checkpoints/`, an installed package's data), $SBIR_HOME/checkpoints."""
    dirs = []
    if os.environ.get("SBIR_CHECKPOINTS"):
        dirs.append(Path(os.environ["SBIR_CHECKPOINTS"]).expanduser())
    return dirs + list(SHIPPED_CHECKPOINT_DIRS) + [home() / "checkpoints"]


def shard_index(path: PathLike) -> Path:
    """The shard index that stands for a checkpoint file: `<path>.index.json`."""
    p = Path(path)
    return p if p.name.endswith(INDEX_SUFFIX) else p.with_name(p.name + INDEX_SUFFIX)


def stored_checkpoint(path: PathLike) -> Path:
    """The file that holds the checkpoint `path` names: the file itself, else its shard index
    (`<path>.index.json`) if that exists, else `path` as given (for the caller's not-found message)."""
    p = Path(path)
    if p.is_file():
        return p
    index = shard_index(p)
    return index if index.is_file() else p


def is_shipped_checkpoint(path: PathLike) -> bool:
    """Whether writing `path` would replace a shipped checkpoint: anything in the shipped
    folders, or a registry file (or its index or shards) where named checkpoints are found."""
    p = Path(path).expanduser().resolve()
    if any(p.is_relative_to(d.resolve()) for d in SHIPPED_CHECKPOINT_DIRS):
        return True
    if p.parent not in {d.expanduser().resolve() for d in checkpoint_dirs()}:
        return False
    shard = _SHARD.fullmatch(p.name)
    names = {p.name, p.name.removesuffix(INDEX_SUFFIX), (shard.group("stem") + ".safetensors") if shard else ""}
    return bool(names & set(CHECKPOINTS.values()))


def list_checkpoints() -> list[str]:
    return sorted(CHECKPOINTS)


def checkpoint_path(name: str = "default") -> Path:
    """A named checkpoint's file, or its shard index (`stored_checkpoint`), from the first
    place it exists; the checkout's path if none. An unknown name raises InputError listing
    the valid ones."""
    if name not in CHECKPOINTS:
        raise InputError(f"unknown checkpoint {name!r}; available: {', '.join(list_checkpoints())} "
                         "(or give a path to a .safetensors file)")
    for d in checkpoint_dirs():
        p = stored_checkpoint(d / CHECKPOINTS[name])
        if p.is_file():
            return p
    return PACKAGE_DIR.parent / "checkpoints" / CHECKPOINTS[name]


# The galleries of a source checkout (the default clip-art gallery ships there).
SHIPPED_GALLERIES = PACKAGE_DIR.parent / "galleries"
