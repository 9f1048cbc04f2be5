"""`index` engines (issue 33): manifests beside folders, corrupt files, the Ray engine
against the default one, resumable shards, and Ray as an optional extra."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_shapes
from sbir_core.gallery.index import EMBEDDINGS_FILE, GALLERY_FILE, Gallery, build_gallery


def _items(gallery_dir):
    meta = json.loads((gallery_dir / GALLERY_FILE).read_text())
    return [(it["path"], it["label"]) for it in meta["items"]], meta["source_dir"]


def _write_manifests(src, folder):
    """The shape folder as a CSV manifest (relative paths) and a Parquet one (absolute paths)."""
    pa = pytest.importorskip("pyarrow", reason="Parquet manifests need pyarrow (pip install .[scale])")
    import pyarrow.parquet as pq

    folder.mkdir()
    rows = [(p, p.parent.name) for p in sorted(src.rglob("*.png"))]
    with open(folder / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([("../" + p.relative_to(src.parent).as_posix(), lab) for p, lab in rows])
    pq.write_table(pa.table({"path": [str(p) for p, _ in rows], "label": [lab for _, lab in rows]}),
                   folder / "list.parquet")
    return folder / "list.csv", folder / "list.parquet"


def test_manifests_give_the_folders_gallery(tmp_path, raw_encoder):
    src = write_shapes(tmp_path / "shapes")
    csv_file, parquet_file = _write_manifests(src, tmp_path / "lists")
    build_gallery(src, tmp_path / "g_folder", raw_encoder, checkpoint="none", progress=False)
    for name, manifest in (("g_csv", csv_file), ("g_parquet", parquet_file)):
        _, report = build_gallery(manifest, tmp_path / name, raw_encoder, checkpoint="none", progress=False)
        assert report.total == 12 and not report.skipped
        assert _items(tmp_path / name) == _items(tmp_path / "g_folder")
        np.testing.assert_array_equal(np.load(tmp_path / name / EMBEDDINGS_FILE),
                                      np.load(tmp_path / "g_folder" / EMBEDDINGS_FILE))
        g = Gallery.load(tmp_path / name)
        assert g.paths[0] == str(src / "circle" / "circle_0.png")  # found where the manifest says
    # The class is the manifest's label column, not the folder name.
    relabelled = tmp_path / "lists" / "relabel.csv"
    relabelled.write_text("path,label\n../shapes/circle/circle_0.png,ring\n../shapes/star/star_1.png,sun\n")
    _, report = build_gallery(relabelled, tmp_path / "g_relabel", raw_encoder, checkpoint="none", progress=False)
    assert _items(tmp_path / "g_relabel")[0] == [("circle/circle_0.png", "ring"), ("star/star_1.png", "sun")]


def test_corrupt_and_missing_files_are_counted_and_skipped(tmp_path, raw_encoder):
    src = write_shapes(tmp_path / "shapes")
    (src / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    manifest = tmp_path / "list.csv"
    rows = [f"{p},{p.parent.name}" for p in sorted(src.rglob("*.png"))] + [f"{src}/gone.png,circle"]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    _, report = build_gallery(manifest, tmp_path / "g", raw_encoder, checkpoint="none", progress=False)
    assert report.total == 12
    reasons = dict(report.skipped)
    assert set(reasons) == {str(src / "circle" / "broken.png"), str(src / "gone.png")}
    assert reasons[str(src / "circle" / "broken.png")].startswith("unreadable image")


def test_engine_ray_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    from sbir_core.cli import main

    src = write_shapes(tmp_path / "shapes")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["index", str(src), "--out", str(tmp_path / "g"), "--engine", "ray", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'sbir-core[scale]'" in err, err
    assert not (tmp_path / "g").exists()


def test_import_sbir_core_does_not_import_ray():
    code = ("import sys, sbir_core, sbir_core.cli, sbir_core.gallery.build, sbir_core.gallery.embed_ray; "
            "sys.exit('ray' in sys.modules or 'pyarrow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_big_jpegs_in_a_photo_gallery_decode_at_a_reduced_scale(tmp_path, raw_encoder):
    from PIL import Image

    from sbir_core.data.images import load_image

    src = write_shapes(tmp_path / "shapes")
    folder = tmp_path / "photos" / "circle"
    folder.mkdir(parents=True)
    shape = Image.open(src / "circle" / "circle_0.png").convert("RGB")
    shape.resize((2400, 1800), Image.Resampling.BICUBIC).save(folder / "big.jpg", quality=90)
    shape.resize((300, 200), Image.Resampling.BICUBIC).save(folder / "small.jpg", quality=90)
    size = raw_encoder.image_size
    assert load_image(folder / "big.jpg").size == (2400, 1800)
    reduced = load_image(folder / "big.jpg", at_least=size)
    assert min(reduced.size) >= size and reduced.size[0] <= 2400 // 4  # 1/4 or 1/8, never below the encoder's size
    small = load_image(folder / "small.jpg", at_least=size)
    assert small.size == (300, 200) and small.tobytes() == load_image(folder / "small.jpg").tobytes()
    g, _ = build_gallery(tmp_path / "photos", tmp_path / "g", raw_encoder, checkpoint="none", progress=False)
    row = g.paths.index(str(folder / "big.jpg"))
    full, drafted = (raw_encoder.encode_photo(im) for im in (load_image(folder / "big.jpg"), reduced))
    np.testing.assert_allclose(g.raw_embeddings[row], drafted, atol=1e-5)  # the engine decoded it reduced
    assert float(full @ drafted) > 0.99  # and it is the same picture to the encoder


# ----------------------------------------------------------------------------- the Ray engine
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray cannot install here (pip install .[scale]); Ray engine not tested")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_matches_the_default_engine(tmp_path, raw_encoder, local_ray):
    from sbir_core.gallery.embed_ray import build_gallery_ray

    src = write_shapes(tmp_path / "shapes")
    (src / "square" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    g_local, r_local = build_gallery(src, tmp_path / "local", raw_encoder, checkpoint="none", progress=False)
    g_ray, r_ray, engine = build_gallery_ray(src, tmp_path / "ray", raw_encoder, checkpoint="none",
                                             progress=False, shard_size=5)
    assert engine.embedded == 3 and engine.reused == 0
    assert not (tmp_path / "ray.shards").exists()  # the default shards folder goes once the gallery is written
    assert _items(tmp_path / "ray") == _items(tmp_path / "local")
    assert r_ray.total == r_local.total == 12
    assert r_ray.skipped == r_local.skipped and len(r_ray.skipped) == 1  # the broken file, counted once
    np.testing.assert_allclose(g_ray.raw_embeddings, g_local.raw_embeddings, atol=1e-4)
    # token grids are stored as float16: a different thread count may round a value of ~10 one
    # or two float16 steps (2^-7 each) the other way
    assert g_ray.tokens is not None
    np.testing.assert_allclose(np.asarray(g_ray.tokens, np.float32), np.asarray(g_local.tokens, np.float32),
                               rtol=4e-3, atol=4e-3)
    for q in g_local.raw_embeddings:
        assert [r.path for r in g_ray.search(q, 10)] == [r.path for r in g_local.search(q, 10)]


@pytest.mark.slow
def test_ray_engine_resumes_from_its_shards(tmp_path, raw_encoder, local_ray):
    from sbir_core.gallery.embed_ray import build_gallery_ray

    src = write_shapes(tmp_path / "shapes")
    shards = tmp_path / "shards"
    kw = dict(checkpoint="none", progress=False, shard_size=4, shards=shards, store_tokens=False)
    g1, _, e1 = build_gallery_ray(src, tmp_path / "g1", raw_encoder, **kw)
    files = sorted(shards.glob("*.parquet"))
    assert e1.embedded == 3 and len(files) == 3
    before = {f.name: f.stat().st_mtime_ns for f in files}
    files[1].unlink()  # as if the run had stopped before this shard was done
    g2, _, e2 = build_gallery_ray(src, tmp_path / "g2", raw_encoder, **kw)
    assert (e2.embedded, e2.reused) == (1, 2)
    assert (e1.workers, e2.workers) == (2, 1)  # one actor per CPU, but never more than the shards to embed
    after = {f.name: f.stat().st_mtime_ns for f in shards.glob("*.parquet")}
    assert after.keys() == before.keys()
    assert [n for n in after if after[n] != before[n]] == [files[1].name]  # only that one re-embedded
    np.testing.assert_allclose(g2.raw_embeddings, g1.raw_embeddings, atol=1e-6)
    assert _items(tmp_path / "g2") == _items(tmp_path / "g1")


def test_index_without_diffusion_ranks_by_similarity_alone(tmp_path, shipped_service, monkeypatch, capsys):
    """`index --no-diffusion`: the shipped checkpoint prescribes gallery diffusion (k = 3);
    a collection too big for that build step can do without it."""
    from sbir_core import cli
    from sbir_core.cli import main

    enc = shipped_service.encoder
    assert enc.retrieval.diffusion_k == 3
    src = write_shapes(tmp_path / "shapes")
    monkeypatch.setattr(cli.common, "load_encoder", lambda name, checkpoint: enc)
    assert main(["index", str(src), "--out", str(tmp_path / "plain"), "--no-diffusion", "--quiet"]) == 0
    assert "searched with no diffusion" in capsys.readouterr().out  # what `index` says it built
    assert main(["index", str(src), "--out", str(tmp_path / "diffused"), "--quiet"]) == 0
    assert "gallery diffusion k=3" in capsys.readouterr().out
    plain, diffused = Gallery.load(tmp_path / "plain"), Gallery.load(tmp_path / "diffused")
    assert (plain.diffusion_k, diffused.diffusion_k) == (0, 3)
    np.testing.assert_array_equal(plain.raw_embeddings, diffused.raw_embeddings)  # the same pictures, as encoded
    q = diffused.raw_embeddings[0]
    assert not np.allclose(plain.score_all(q), diffused.score_all(q))  # ranked another way


@pytest.mark.parametrize("model", ["raw", "shipped"])
def test_every_way_of_encoding_gives_the_same_batches(tmp_path, model, request):
    """In turns, in two streams (a CPU) or overlapped (a GPU): the same pictures in the same
    order, the same embeddings (streams encode on fewer threads each: float sums may differ
    in the last bits), the same file skipped; the caller's torch threads are left as they were."""
    import torch

    from sbir_core.gallery.build import _Candidate
    from sbir_core.gallery.encode import encode_batches

    encoder = (request.getfixturevalue("raw_encoder") if model == "raw"
               else request.getfixturevalue("shipped_service").encoder)  # the shipped checkpoint, as `index` runs it
    src = write_shapes(tmp_path / "shapes")
    (src / "star" / "broken.png").write_bytes(b"not a picture")
    todo = [_Candidate(p.name, p, p.parent.name, 0, 0) for p in sorted(src.rglob("*.png"))]
    threads = torch.get_num_threads()
    runs = {}
    for way in ("turns", "streams", "overlap"):
        skipped: list = []
        out = list(encode_batches(encoder, "photo", todo, 5, skipped, way=way))
        runs[way] = ([c.path for b, _ in out for c in b], np.concatenate([o.normalized() for _, o in out]), skipped)
    assert torch.get_num_threads() == threads
    assert len(runs["turns"][0]) == 12 and len(runs["turns"][2]) == 1
    for way in ("streams", "overlap"):
        assert runs[way][0] == runs["turns"][0] and runs[way][2] == runs["turns"][2]
    np.testing.assert_array_equal(runs["overlap"][1], runs["turns"][1])
    np.testing.assert_allclose(runs["streams"][1], runs["turns"][1], atol=1e-5)
    with pytest.raises(ValueError, match="way must be"):
        list(encode_batches(encoder, "photo", todo, 5, [], way="fast"))


def test_the_default_way_fits_the_device_the_threads_and_the_batches(raw_encoder, monkeypatch):
    import torch

    from sbir_core.gallery.encode import default_way

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert default_way(raw_encoder, 10) == "streams"
    assert default_way(raw_encoder, 1) == "turns"  # one batch: all of torch's threads on it
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # e.g. a one-CPU Ray actor
    assert default_way(raw_encoder, 10) == "turns"

    class OffCPU:  # stands for an encoder on a GPU: its weights are not on the CPU
        def parameters(self):
            return iter([torch.empty(1, device="meta")])

    assert default_way(OffCPU(), 10) == "overlap"
