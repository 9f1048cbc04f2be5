"""Where things live: package data, the shipped checkpoints, and one data root.

Everything sbir_core writes (feature caches, the app's thumbnails, visitors' uploaded
galleries, galleries built with `Gallery.build`) goes under one root, `$SBIR_HOME`
(default `~/.cache/sbir`). Checkpoints are found by name, like `clip.load("ViT-B/32")`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from sbir_core.errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
MODEL_CONFIGS_DIR = PACKAGE_DIR / "model_configs"
EXAMPLES_DIR = PACKAGE_DIR / "examples"

# Named checkpoints shipped with the project.
CHECKPOINTS = {
    "default": "default.safetensors",     # the retrieval model (fine-tuned encoder + heads)
    "relation": "relation.safetensors",   # the cross-attention relation network (explanations)
}


def home() -> Path:
    """The one data root: $SBIR_HOME, default ~/.cache/sbir."""
    return Path(os.environ.get("SBIR_HOME") or Path.home() / ".cache" / "sbir").expanduser()


def cache_dir() -> Path:
    return home() / "cache"


def galleries_dir() -> Path:
    return home() / "galleries"


def checkpoint_dirs() -> list[Path]:
    """Where named checkpoints are looked for, in order: $SBIR_CHECKPOINTS, the
    `checkpoints/` folder of a source checkout, the installed data
    (`<prefix>/share/sbir_core/checkpoints`, what `pip install .` puts there), and
    $SBIR_HOME/checkpoints."""
    dirs = []
    if os.environ.get("SBIR_CHECKPOINTS"):
        dirs.append(Path(os.environ["SBIR_CHECKPOINTS"]).expanduser())
    dirs += [PACKAGE_DIR.parent / "checkpoints", Path(sys.prefix) / "share" / "sbir_core" / "checkpoints",
             home() / "checkpoints"]
    return dirs


def list_checkpoints() -> list[str]:
    return sorted(CHECKPOINTS)


def checkpoint_path(name: str = "default") -> Path:
    """A named checkpoint's file (the first place it exists; the checkout's path if none).
    An unknown name raises InputError listing the valid ones."""
    if name not in CHECKPOINTS:
        raise InputError(f"unknown checkpoint {name!r}; available: {', '.join(list_checkpoints())} "
                         "(or give a path to a .safetensors file)")
    for d in checkpoint_dirs():
        p = d / CHECKPOINTS[name]
        if p.is_file():
            return p
    return PACKAGE_DIR.parent / "checkpoints" / CHECKPOINTS[name]


# The galleries of a source checkout (the default clip-art gallery ships there).
SHIPPED_GALLERIES = PACKAGE_DIR.parent / "galleries"
