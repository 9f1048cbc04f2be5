"""Several app processes on one $SBIR_HOME (docs/CLASSROOM.md, "Several app processes"):
two services, each with its own locks and caches as two processes have, build, index and
read the same galleries and cache folders at the same moment without spoiling them."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import APP_SHAPES, at_once, write_shapes
from sbir_core.gallery.sharing import new_owner_token
from sbir_core.service import RetrievalService

SQUARE = [[[40, 40], [200, 40], [200, 200], [40, 200], [40, 40]]]


@pytest.fixture()
def two_services(tmp_path, monkeypatch, raw_encoder):
    monkeypatch.setenv("SBIR_HOME", str(tmp_path / "home"))  # caches and class galleries: shared
    src = write_shapes(tmp_path / "photos", seed_step=10)
    root = tmp_path / "galleries"
    root.mkdir()
    services = [RetrievalService(root, gallery=None, encoder=raw_encoder, relation=None) for _ in range(2)]
    assert services[0].thumbs_dir == services[1].thumbs_dir and str(tmp_path / "home") in str(services[0].thumbs_dir)
    return services, src, tmp_path


def _thumbs_whole(folder: Path) -> int:
    n = 0
    for f in folder.rglob("*.jpg"):
        with Image.open(f) as im:
            im.load()  # a half-written JPEG raises here
        n += 1
    assert not list(folder.rglob("*.tmp")), "a temporary file was left behind"
    return n


def test_two_processes_index_and_read_one_galleryat_once(two_services):
    (a, b), src, _ = two_services
    # Two processes started with the same --gallery index it into the same folder at once.
    outs = at_once(lambda s: s.build_gallery_from_folder(src, "shapes"), [a, b])
    assert all(o.ok for o in outs), [o.message for o in outs]
    # Both search it and write its thumbnails into the one cache at the same moment.
    hits = at_once(lambda s: s.search_sketch(SQUARE, 6, gallery="shapes").hits, [a, b])
    assert hits[0] and [(h.index, h.label) for h in hits[0]] == [(h.index, h.label) for h in hits[1]]
    n = len(a.gallery("shapes"))
    # (Thumbnail folders are named by each build's time: two builds, two folders, never mixed.)
    thumbs = at_once(lambda s: [s.thumbnail(s.gallery("shapes"), i) for i in range(n)], [a, b])
    assert all(len(set(t)) == n == 4 * 3 for t in thumbs)
    assert _thumbs_whole(a.thumbs_dir) >= n
    # A third process started later finds the gallery as the first two left it.
    c = RetrievalService(a.store.root, gallery="shapes", encoder=a.encoder, relation=None)
    assert [h.index for h in c.search_sketch(SQUARE, 6, gallery="shapes").hits] == [h.index for h in hits[0]]


def test_a_class_gallery_built_in_one_process_opens_in_the_other(two_services):
    """A visitor whose next request lands on another process still finds the class gallery
    they built (by its id), while the other process builds one of its own at the same time."""
    (a, b), src, _ = two_services
    files = {s: [str(p) for kind in kinds for p in sorted((src / kind).glob("*.png"))]
             for s, kinds in ((a, APP_SHAPES[:2]), (b, APP_SHAPES[2:]))}
    owners = {a: new_owner_token(), b: new_owner_token()}
    outs = at_once(lambda s: s.build_gallery_from_uploads(files[s], "ours", owners[s]), [a, b])
    assert all(o.ok for o in outs), [o.message for o in outs]
    assert outs[0].name != outs[1].name  # two galleries, one each
    for built, other, kinds in ((outs[0], b, APP_SHAPES[:2]), (outs[1], a, APP_SHAPES[2:])):
        hits = other.search_sketch(SQUARE, 6, gallery=built.name).hits
        assert hits and {h.label for h in hits} <= set(kinds)  # the builder's pictures, nobody else's
    assert _thumbs_whole(a.thumbs_dir) > 0
