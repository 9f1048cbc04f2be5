"""The README's Python example runs as written (from another folder, shipped model)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sbir_core.paths import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no ```python block under '## Python API' in README.md"
    return m.group(1)


@pytest.mark.skipif(not checkpoint_path("default").is_file(), reason="no shipped checkpoint")
def test_readme_python_example_runs(tmp_path, monkeypatch):
    # A fresh folder holding only what the example names: a folder of photos, the shipped
    # gallery's classes (every house, two pictures of each other class: 142 of 399 to index).
    for cls in sorted((ROOT / "galleries" / "default" / "images").iterdir()):
        (tmp_path / "photos" / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:None if cls.name == "house" else 2]:
            shutil.copy(f, tmp_path / "photos" / cls.name / f.name)  # the builder skips symlinks
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SBIR_HOME", str(tmp_path / "home"))
    scope: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), scope)
    hits = scope["hits"]
    assert len(hits) == 10 and "house" in [h.label for h in hits[:5]], [h.label for h in hits[:5]]
    assert (tmp_path / "why.png").is_file()
