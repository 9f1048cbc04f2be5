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
