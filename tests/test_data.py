import json
import os
from pathlib import Path

import pytest
from PIL import Image

from shared_data import SHARED, needs_shared
from sbir_core.data.datasets import (
    ExcludedClassError, Item, UnknownSplitError, assert_no_excluded, benchmark, image_folder, quickdraw_folder,
    training_items,
)



@pytest.fixture
def tiny_root(tmp_path):
    """A miniature copy of the shared data layout, made from generated files."""
    for folder in ("cat_folder", "dalmatian", "chair"):
        d = tmp_path / "caltech101" / folder
        d.mkdir(parents=True)
        Image.new("RGB", (20, 20), "red").save(d / "a.jpg")
    qd = tmp_path / "quickdraw"
    qd.mkdir()
    for word in ("cat", "dog", "chair"):
        rec = {"word": word, "key_id": "1", "drawing": [[[0, 10], [0, 10]]]}
        (qd / f"{word}.ndjson").write_text(json.dumps(rec) + "\n")
    (tmp_path / "pacs" / "sketch" / "dog").mkdir(parents=True)
    (tmp_path / "pacs" / "photo" / "dog").mkdir(parents=True)
    Image.new("L", (20, 20), 255).save(tmp_path / "pacs" / "sketch" / "dog" / "s.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "pacs" / "photo" / "dog" / "p.jpg")
    splits = {
        "pacs": {"unseen_classes": ["dog"], "exclude_from_training": {"quickdraw": ["dog"], "caltech101": ["dalmatian"]}},
        "caltech101_to_quickdraw": {"cat_folder": "cat", "dalmatian": "dog", "chair": "chair"},
    }
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    return tmp_path


def test_wrong_split_name_lists_the_valid_ones(tiny_root):
    with pytest.raises(UnknownSplitError, match="pacs"):
        benchmark(tiny_root, "sketchy")


def test_training_never_sees_excluded_classes(tiny_root):
    items = training_items(tiny_root, exclude=("pacs",))
    labels = {(i.modality, i.label) for i in items}
    assert labels == {("photo", "cat"), ("photo", "chair"), ("sketch", "cat"), ("sketch", "chair")}
    # Caltech folders are mapped to the shared class name.
    assert all(Path(i.path).parent.name != "dalmatian" for i in items if i.path)


def test_excluded_class_smuggled_in_raises(tiny_root):
    bad = Item(label="dog", modality="sketch", strokes=[[[0], [0]]], key="x")
    with pytest.raises(ExcludedClassError):
        assert_no_excluded([bad], tiny_root, ("pacs",))


def test_image_folder_labels_and_quickdraw_strokes(tiny_root):
    items = image_folder(tiny_root / "caltech101")
    assert {i.label for i in items} == {"cat_folder", "dalmatian", "chair"}
    qd = quickdraw_folder(tiny_root / "quickdraw", classes=["cat"])
    # QuickDraw's [[xs], [ys]] read as such (a 2 x 2 stroke too): the segment (0, 0) -> (10, 10)
    assert len(qd) == 1 and [s.tolist() for s in qd[0].strokes] == [[[0, 0], [10, 10]]] and qd[0].modality == "sketch"


@needs_shared
def test_real_benchmark_sizes():
    q, g = benchmark(SHARED, "pacs")
    assert (len(q), len(g)) == (3929, 1670)
    q, g = benchmark(SHARED, "doodle")
    assert len(q) == 200 and {i.label for i in g} == {i.label for i in q}


@needs_shared
def test_real_training_pool_excludes_both_benchmarks():
    items = training_items(SHARED)
    labels = {i.label for i in items}
    splits = json.loads((SHARED / "splits.json").read_text())
    for name in ("pacs", "doodle"):
        assert not labels & set(splits[name]["unseen_classes"])
    assert not {Path(i.path).parent.name for i in items if i.path} & {"dalmatian", "electric_guitar", "flamingo_head"}


def test_packed_training_data_selects_what_the_full_data_does(tiny_root, tmp_path):
    """scripts/pack_training_data.py: what travels to a GPU machine trains on the same items."""
    from scripts_loader import load_script

    pack = load_script("pack_training_data")
    big = tiny_root / "caltech101" / "chair"
    Image.new("RGB", (400, 300), "blue").save(big / "b.jpg")
    (big / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "packed"
    summary = pack.pack(tiny_root, out, max_side=64, exclude=("pacs",))

    def selection(root):  # keys are paths (doodles: path#n); photos travel as WebP
        return sorted((os.path.splitext(os.path.relpath(i.key, root))[0] if i.modality == "photo"
                       else os.path.relpath(i.key, root), i.label)
                      for i in training_items(root, exclude=("pacs",), max_photos_per_class=60))

    assert selection(out) == [s for s in selection(tiny_root) if "broken" not in s[0]]
    assert max(Image.open(out / "caltech101" / "chair" / "b.webp").size) == 64
    assert len(summary["skipped"]) == 1 and "broken.jpg" in summary["skipped"][0]
    assert (out / "splits.json").read_text() == (tiny_root / "splits.json").read_text()
    assert not (out / "pacs").exists()  # benchmark data stays behind


def test_the_data_root_is_found_in_one_order_and_its_absence_said_plainly(tmp_path, monkeypatch, capsys):
    """--data, then $SBIR_DATA, then ../shared/data; none: one error naming all three."""
    from sbir_core.cli import main
    from sbir_core.data import datasets
    from sbir_core.errors import InputError

    arg, env, beside = (tmp_path / n for n in ("arg", "env", "beside"))
    for d in (arg, env, beside):
        d.mkdir()
        (d / "splits.json").write_text("{}")
    monkeypatch.setattr(datasets, "_DEFAULT_ROOTS", (beside,))
    monkeypatch.delenv("SBIR_DATA", raising=False)
    assert datasets.data_root() == beside
    monkeypatch.setenv("SBIR_DATA", str(env))
    assert datasets.data_root() == env
    assert datasets.data_root(str(arg)) == arg
    with pytest.raises(InputError, match=r"--data = .*empty.*: pass --data DIR, set \$SBIR_DATA"):
        datasets.data_root(tmp_path / "empty")  # a --data that is wrong is an error, not a fallback
    monkeypatch.setenv("SBIR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match=r"\$SBIR_DATA = .*nowhere"):
        datasets.data_root()
    # the command line reports it as one line, before any model loads
    assert main(["confidence-queries", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no shared data folder") and "\n" not in err and "../shared/data" in err
