"""The repository can be pushed to a Hugging Face Space as it is (issue 34): every file
under 10 MB (the shipped model is stored as shards the one checkpoint reader joins, bit
for bit), the Space header names the Gradio and Python it runs on, and the package list
that installs the checkpoints stays complete."""
from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

from sbir_core.errors import InputError
from sbir_core.models.checkpoint import (checkpoint_digest, read_metadata, read_stored, read_tensors,
                                         split_checkpoint, write_tensors)
from sbir_core.paths import checkpoint_path, shard_index

ROOT = Path(__file__).resolve().parents[1]
SPACE_FILE_LIMIT = 10_000_000  # bytes: a Space refuses a plain git push of any larger file


def _repo_files() -> list[Path]:
    """Tracked files and those git would add (untracked, not ignored) that exist now."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in out.splitlines() if (ROOT / n).is_file()]


def _front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md must start with the Space's front matter"
    return {k.strip(): v.strip().strip('"') for k, _, v in (ln.partition(":") for ln in m.group(1).splitlines())}


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ----------------------------------------------------------------------------- Space rules
def test_every_repository_file_is_under_10_mb():
    files = _repo_files()
    assert any(p.parent.name == "checkpoints" for p in files)
    big = {str(p.relative_to(ROOT)): p.stat().st_size for p in files if p.stat().st_size >= SPACE_FILE_LIMIT}
    assert not big, f"a Space refuses these (split checkpoints with scripts/shard_checkpoint.py): {big}"


def test_space_header_names_the_installed_gradio_and_python():
    gradio = pytest.importorskip("gradio")
    head = _front_matter()
    assert head["sdk"] == "gradio" and head["app_file"] == "app.py"
    assert head["sdk_version"] == gradio.__version__, "README's sdk_version must be the Gradio the tests ran on"
    assert head["python_version"] == "3.11"


def test_the_package_list_is_complete():
    """pyproject lists its packages (to map checkpoints/ into sbir_core): none may be missed."""
    from setuptools import find_packages

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = set(find_packages(str(ROOT), include=["sbir_core", "sbir_core.*", "sbir_app", "sbir_app.*"]))
    assert set(conf["packages"]) == found | {"sbir_core.checkpoints"}
    assert conf["package-dir"] == {"sbir_core.checkpoints": "checkpoints"}
    assert "*.safetensors" in conf["package-data"]["sbir_core.checkpoints"]


# ----------------------------------------------------------------------------- shards
@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(64, 64, generator=g).half(), "a.bias": torch.randn(64, generator=g),
               "b.weight": torch.randn(32, 128, generator=g).half(), "steps": torch.tensor([7, 9]),
               "c": torch.randn(300, generator=g).to(torch.bfloat16)}
    return write_tensors(tmp_path / "model.safetensors", tensors, {"encoder": "test", "note": "é"})


def test_shards_read_back_bit_identical_and_keep_the_id(small_checkpoint, tmp_path):
    single = small_checkpoint
    tensors, meta = read_tensors(single)
    digest = checkpoint_digest(single)
    index = split_checkpoint(single, tmp_path / "split" / "model.safetensors", max_shard_bytes=5_000)
    shards = sorted(index.parent.glob("model-*-of-*.safetensors"))
    assert index == shard_index(tmp_path / "split" / "model.safetensors") and len(shards) >= 3
    assert json.loads(index.read_text())["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values())
    # named by the index, or by the single file's name, which no longer exists
    for name in (index, tmp_path / "split" / "model.safetensors"):
        got, got_meta = read_tensors(name)
        assert got_meta == meta and got.keys() == tensors.keys()
        assert all(got[k].dtype == tensors[k].dtype and _bytes(got[k]) == _bytes(tensors[k]) for k in tensors)
        assert read_metadata(name) == meta
        assert checkpoint_digest(name) == digest  # galleries and caches made with it stay valid
    # splitting in place removes the single file; a re-split replaces the old shards
    split_checkpoint(single)
    assert not single.exists() and checkpoint_digest(single) == digest
    split_checkpoint(shard_index(single), max_shard_bytes=1 << 30)  # named by its index
    assert sorted(p.name for p in single.parent.glob("model*")) == [
        "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert checkpoint_digest(single) == digest


def test_broken_shard_sets_are_refused_plainly(small_checkpoint, tmp_path):
    index = split_checkpoint(small_checkpoint, tmp_path / "s" / "m.safetensors", max_shard_bytes=5_000)
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    bad = dict(data, weight_map={**data["weight_map"], "a.bias": "../elsewhere.safetensors"})
    index.write_text(json.dumps(bad))
    with pytest.raises(InputError, match="outside its folder"):
        read_tensors(index)
    moved = {k: (first if v != first else v) for k, v in data["weight_map"].items()}  # lists tensors it lacks
    index.write_text(json.dumps(dict(data, weight_map=moved)))
    with pytest.raises(InputError, match="re-split"):
        read_tensors(index)
    index.write_text("{}")
    with pytest.raises(InputError, match="shard index"):
        read_tensors(index)


def test_the_shipped_model_is_stored_in_shards_with_the_default_gallerys_id():
    path = checkpoint_path("default")
    if not path.is_file():
        pytest.skip("no shipped checkpoint")
    assert path.name == "default.safetensors.index.json"
    tensors, header = read_stored(path)
    assert "sbir" in header and any(k.startswith("backbone.") for k in tensors)
    gallery = json.loads((ROOT / "galleries" / "default" / "index" / "gallery.json").read_text())
    assert gallery["encoder_id"].endswith("@" + checkpoint_digest(path))  # the shipped index stays valid


# ----------------------------------------------------------------------------- the front door
MAX_SCRIPTS = 12  # tools a user or maintainer runs; measurements and tried ideas go to experiments/
CODE_DIRS = ("scripts", "experiments", "sbir_core", "sbir_app")
DOCS = ("README.md", "docs", "scripts/README.md", "experiments/README.md")
NAMED_PATH = re.compile(r"(?<![\w:/.-])((?:scripts|experiments)/[\w.-]+\.(?:py|sh|md))")
OLD_COMMIT = re.compile(r"\bcommit [0-9a-f]{7,40}\b")


def _code_files() -> list[Path]:
    files = [ROOT / "app.py"] + [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".sh")]
    return [p for p in files if "__pycache__" not in p.parts]


def _doc_files() -> list[Path]:
    return [p for d in DOCS for p in ([ROOT / d] if (ROOT / d).is_file() else sorted((ROOT / d).glob("*.md")))]


def test_scripts_are_a_short_list_each_named_in_their_readme():
    tools = sorted(p.name for p in (ROOT / "scripts").iterdir() if p.is_file() and p.name != "README.md")
    assert len(tools) <= MAX_SCRIPTS, f"scripts/ holds {len(tools)} tools (at most {MAX_SCRIPTS}): {tools}"
    readme = (ROOT / "scripts" / "README.md").read_text(encoding="utf-8")
    assert not [t for t in tools if t not in readme], "every script needs its line in scripts/README.md"


def test_every_experiment_says_what_it_found_and_which_section_it_backs():
    import ast

    readme = (ROOT / "experiments" / "README.md").read_text(encoding="utf-8")
    for p in sorted((ROOT / "experiments").glob("*.py")):
        assert p.name in readme, f"{p.name} needs its line in experiments/README.md"
        if p.stem == "sweep":  # the helper the sweeps share
            continue
        doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or ""
        assert "\nFinding: " in doc and "\nBacks: docs/" in doc, f"{p.name}: its docstring needs Finding: and Backs:"


def test_no_code_edits_the_import_path():
    """Scripts and experiments import the installed package (`pip install -e .`); a script
    that needs a sibling runs from its own folder, which Python puts on the path itself."""
    edits = [f"{p.relative_to(ROOT)}:{i}" for p in _code_files()
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "sys.path" in line]
    assert not edits, f"sys.path edited at {edits}"


def test_the_data_root_is_decided_in_one_place():
    """--data, $SBIR_DATA, ../shared/data: only sbir_core.data.datasets.data_root spells the default."""
    spelled = [str(p.relative_to(ROOT)) for p in _code_files() if p.name != "datasets.py"
               and re.search(r"""["']shared["']\s*/\s*["']data["']|parents\[\d\]\s*/\s*["']shared""", p.read_text(encoding="utf-8"))]
    assert not spelled, f"find the shared data with data_root(), not by hand: {spelled}"


def test_every_script_and_experiment_the_docs_name_exists():
    """In README, docs/, the two folders' READMEs and every docstring or comment of the code."""
    missing = set()
    for doc in _doc_files() + _code_files():
        for line in doc.read_text(encoding="utf-8").splitlines():
            if OLD_COMMIT.search(line):  # a command as it ran at an older commit
                continue
            missing |= {f"{doc.relative_to(ROOT)}: {m}" for m in NAMED_PATH.findall(line) if not (ROOT / m).is_file()}
    assert not missing, sorted(missing)
