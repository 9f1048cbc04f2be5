"""The quick subset (`-m "not slow and not browser"`) stays what it says: every test that
starts a browser is marked `browser`, the `slow` set is the short list below, each with its
reason, and `pytest --markers` describes both."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# What starts a browser: Playwright, or the conftest helper that opens the page in one.
BROWSER_CALLS = {"sync_playwright", "async_playwright", "open_page"}
# The long-running checks, by nature (test module, or module::test): why each is slow.
SLOW = {
    "test_finetune.py": "trains small encoders end to end",
    "test_packed_training.py": "trains runs with the device script",
    "test_model_quality.py": "benchmarks the shipped model on the shared data",
    "test_install.py::test_wheel_installs_find_the_shipped_checkpoint": "pip-installs the project several times",
    "test_embed_engines.py::test_ray_engine_matches_the_default_engine": "starts a local Ray cluster",
    "test_embed_engines.py::test_ray_engine_resumes_from_its_shards": "starts a local Ray cluster",
    "test_classroom.py::test_uploads_are_deleted_even_while_more_arrive": "waits out real sweep ages (4 s of wall time)",
}


def _marks(decorators: list[ast.expr]) -> set[str]:
    """`pytest.mark.NAME` (called or not) among a function's decorators."""
    out = set()
    for d in decorators:
        d = d.func if isinstance(d, ast.Call) else d
        if isinstance(d, ast.Attribute) and isinstance(d.value, ast.Attribute) and d.value.attr == "mark":
            out.add(d.attr)
    return out


def _module_marks(tree: ast.Module) -> set[str]:
    """The marks of `pytestmark = pytest.mark.X` (or a list of them)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            return _marks(values)
    return set()


def _names_called(node: ast.AST) -> set[str]:
    return {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}


def marker_problems(files: dict[str, str]) -> list[str]:
    """Test functions that start a browser without the `browser` mark; `slow` marks on tests
    not in SLOW, and SLOW entries that are not marked."""
    problems, slow_seen = [], set()
    for name, text in sorted(files.items()):
        tree = ast.parse(text)
        module = _module_marks(tree)
        helpers = {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("test_")
                   and _names_called(f) & BROWSER_CALLS}  # a helper of this module that opens one
        for f in tree.body:
            if not (isinstance(f, ast.FunctionDef) and f.name.startswith("test_")):
                continue
            marks = module | _marks(f.decorator_list)
            if _names_called(f) & (BROWSER_CALLS | helpers) and "browser" not in marks:
                problems.append(f"{name}::{f.name} starts a browser but is not marked `browser`")
            if "slow" in marks:
                key = name if "slow" in module else f"{name}::{f.name}"
                slow_seen.add(key)
                if key not in SLOW:
                    problems.append(f"{key} is marked `slow`: add it to SLOW with its reason, or make it quick")
    problems += [f"{key} is in SLOW but not marked `slow`" for key in sorted(set(SLOW) - slow_seen)
                 if key.split("::")[0] in files]
    return problems


def test_browser_tests_are_marked_and_the_slow_set_is_the_listed_one() -> None:
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(TESTS.glob("test_*.py"))}
    problems = marker_problems(files)
    assert not problems, "\n".join(problems)


def test_the_marker_check_can_fail() -> None:
    unmarked = "def test_page():\n    with sync_playwright() as p:\n        pass\n"
    via_helper = "def _open(u):\n    return open_page(None, u, 1, 1)\n\ndef test_page():\n    _open('x')\n"
    marked = "import pytest\n\n@pytest.mark.browser\ndef test_page():\n    open_page(None, 'u', 1, 1)\n"
    module_marked = ("import pytest\npytestmark = pytest.mark.browser\n\n"
                     "def test_page():\n    open_page(None, 'u', 1, 1)\n")
    assert "not marked `browser`" in " ".join(marker_problems({"test_a.py": unmarked}))
    assert "not marked `browser`" in " ".join(marker_problems({"test_a.py": via_helper}))
    assert marker_problems({"test_a.py": marked}) == marker_problems({"test_a.py": module_marked}) == []
    slow = "import pytest\n\n@pytest.mark.slow\ndef test_long():\n    pass\n"
    assert "add it to SLOW" in " ".join(marker_problems({"test_a.py": slow}))
    assert "not marked `slow`" in " ".join(marker_problems({"test_finetune.py": "def test_x():\n    pass\n"}))


def test_pytest_describes_both_markers(pytestconfig) -> None:
    """What `pytest --markers` lists: the markers declared in pyproject.toml, with their descriptions."""
    declared = dict(line.split(":", 1) for line in pytestconfig.getini("markers"))
    for mark in ("browser", "slow"):
        assert len(declared.get(mark, "").strip()) > 20, f"`{mark}` has no description in pyproject.toml"
