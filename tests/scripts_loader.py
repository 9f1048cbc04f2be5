"""The repository's tools (scripts/*.py) and experiments (experiments/*.py), not packages, as
modules for tests of their parts."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
EXPERIMENTS = ROOT / "experiments"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py, imported afresh."""
    return _load(SCRIPTS / f"{name}.py")


def load_experiment(name: str) -> ModuleType:
    """experiments/<name>.py, imported afresh."""
    return _load(EXPERIMENTS / f"{name}.py")
