"""Class galleries (issue 32): a teacher builds a gallery before class (in the page or with
`index --share`), it survives a restart, students open it by code or link and search it but
cannot change it, the owner can; codes are strict, limits hold, and camera-style file names
get a warning in the build report."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import api_client, make_shape_image, serve
from sbir_core.gallery import sharing
from sbir_core.gallery.build import naming_warnings
from sbir_core.gallery.sharing import CODE_ALPHABET, CODE_LENGTH, ClassGalleries, ShareError, parse_code
from sbir_core.gallery.store import label_from_filename

OWNER = "a" * 32


# ----------------------------------------------------------------------------- codes and tokens
def test_codes_are_unguessable_and_easy_to_read():
    assert len(set(CODE_ALPHABET)) == 30 and not set("0O1IlLU") & set(CODE_ALPHABET)
    assert CODE_LENGTH * math.log2(len(CODE_ALPHABET)) > 48  # ~6e14 codes
    codes = {sharing.new_code() for _ in range(200)}
    assert len(codes) == 200 and all(len(c) == CODE_LENGTH for c in codes)


@pytest.mark.parametrize("typed", ["ABCDE-23456", "abcde 23456", " abcde23456 ",
                                   "http://10.0.0.5:7860/?class=ABCDE23456", "https://x.hf.space/?x=1&class=abcde-23456"])
def test_a_code_is_read_however_it_is_typed(typed):
    assert parse_code(typed) == "ABCDE23456"


@pytest.mark.parametrize("garbage", ["", "ABCDE", "ABCDE234567", "../../etc/passwd", "ABCDE/2345", "OOOOO11111",
                                     "ABCDE2345%", "x" * 5000, None, 7, ["ABCDE23456"]])
def test_anything_else_is_refused_with_one_sentence(garbage):
    with pytest.raises(ShareError) as exc:
        parse_code(garbage)
    assert str(exc.value) == sharing.BAD_CODE


def test_only_a_hash_of_the_owner_token_is_kept(tmp_path):
    reg = ClassGalleries(tmp_path)
    info, new = reg.reserve("animals", OWNER)
    assert new and reg.reserve("animals", OWNER) == (info, False)  # same owner, same name: same gallery
    other, new = reg.reserve("animals", "b" * 32)
    assert new and other.code != info.code  # another owner's "animals" is another gallery
    text = (tmp_path / info.code / "share.json").read_text()
    assert OWNER not in text and sharing.owner_hash(OWNER) in text
    with pytest.raises(ShareError, match="Only the person"):
        reg.delete(info.code, "b" * 32)
    with pytest.raises(ShareError, match="Only the person"):
        reg.rename(info.code, "mine", "not a token")
    assert reg.delete(info.code, OWNER).name == "animals" and reg.read(info.code) is None


# ----------------------------------------------------------------------------- limits
def test_limits_per_owner_and_in_total(tmp_path, monkeypatch):
    monkeypatch.setattr(sharing, "MAX_PER_OWNER", 2)
    monkeypatch.setattr(sharing, "MAX_SHARED", 3)
    reg = ClassGalleries(tmp_path)
    a1, _ = reg.reserve("one", OWNER)
    reg.reserve("two", OWNER)
    with pytest.raises(ShareError, match="You already have 2 galleries"):
        reg.reserve("three", OWNER)
    assert reg.reserve("one", OWNER)[0].code == a1.code  # rebuilding one of them is fine
    b1, _ = reg.reserve("b", "b" * 32)
    # Full, and every gallery used within the hour: the build is refused, nothing removed.
    with pytest.raises(ShareError, match="in use"):
        reg.reserve("c", "c" * 32)
    assert len(reg.all()) == 3
    # The least recently used one goes first once it has been idle for more than an hour.
    old = os.path.getmtime(tmp_path / a1.code / "share.json") - 2 * sharing.KEEP_IF_USED_WITHIN
    for i, code in enumerate([a1.code, b1.code]):
        (tmp_path / code / sharing.USED_FILE).touch()
        os.utime(tmp_path / code / sharing.USED_FILE, (old + i, old + i))
    c1, _ = reg.reserve("c", "c" * 32)
    assert reg.read(a1.code) is None and reg.read(b1.code) is not None and len(reg.all()) == 3
    # Galleries the operator built with the command line are never removed and never counted.
    for i in range(4):
        reg.reserve(f"pinned{i}", "d" * 32, pinned=True)
    assert len([i for i in reg.all() if i.pinned]) == 4


def test_a_gallery_removed_to_make_room_leaves_nothing_behind(app_galleries, raw_encoder, tmp_path, monkeypatch):
    from sbir_core.service import RetrievalService

    monkeypatch.setattr(sharing, "MAX_SHARED", 1)
    svc = RetrievalService(app_galleries, encoder=raw_encoder, relation=None, cache_dir=tmp_path / "cache",
                           uploads_dir=tmp_path / "class")
    pics = _pictures(tmp_path / "a", ["star_1.png", "circle_1.png", "star_2.png", "circle_2.png"])
    first = svc.build_gallery_from_uploads([str(p) for p in pics], "a", OWNER)
    assert svc.search_sketch([[(10, 10), (90, 90)]], 1, gallery=first.name).ok  # makes its thumbnail
    assert svc.map_image(gallery=first.name).ok  # and its map
    caches = (svc.thumbs_dir, svc.thumbs_dir.parent / "maps")
    thumbs = lambda: [t for d in caches for t in d.iterdir() if t.name.startswith("class-")]  # noqa: E731
    assert len(thumbs()) == 2
    code = first.name.removeprefix("class:")
    used = tmp_path / "class" / code / sharing.USED_FILE
    os.utime(used, (1, 1))  # idle for a long time
    second = svc.build_gallery_from_uploads([str(p) for p in _pictures(tmp_path / "b", ["circle_1.png"])], "b",
                                            "b" * 32)
    assert second.ok and not (tmp_path / "class" / code).exists() and thumbs() == []
    out = svc.search_sketch([[(10, 10), (90, 90)]], 1, gallery=first.name)
    assert not out.ok and out.message == sharing.NO_SUCH_CODE


# ----------------------------------------------------------------------------- class names from file names
@pytest.mark.parametrize("names,warned", [
    (["image_0001.jpg", "image_0002.jpg", "image_0003.jpg"], "“image”"),
    (["IMG_1234.JPG", "IMG_1240.JPG", "cat_1.jpg"], "“img”"),
    (["DSC00012.jpg", "dog_1.jpg"], "“dsc”"),
    (["0001.png", "0002.png", "cat_1.png"], "“uploaded”"),
    (["PXL_20230101_101010.jpg", "cat_1.jpg"], "“pxl_20230101”"),
    (["cat_1.jpg", "cat_2.jpg"], "one class"),
    (["cat_1.jpg", "dog_1.jpg", "picture_frame_1.jpg"], None),
])
def test_camera_file_names_get_a_warning(names, warned):
    warnings = naming_warnings([label_from_filename(n) for n in names])
    if warned is None:
        assert warnings == []
    else:
        assert warned in " ".join(warnings) and "cat_1.jpg" in warnings[-1] and "cat/1.jpg" in warnings[-1]


def _pictures(folder: Path, names, kind="star") -> list[Path]:
    out = []
    for i, n in enumerate(names):
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        make_shape_image(kind if "/" not in n else n.split("/")[0], seed=500 + i).save(p)
        out.append(p)
    return out


def test_build_report_warns_in_the_page_and_the_command_line(app_galleries, raw_encoder, tmp_path, monkeypatch):
    from sbir_core.cli import main
    from sbir_core.cli import common
    from sbir_core.service import RetrievalService

    svc = RetrievalService(app_galleries, encoder=raw_encoder, relation=None, cache_dir=tmp_path / "cache",
                           uploads_dir=tmp_path / "home" / "class-galleries")
    files = _pictures(tmp_path / "camera", ["image_0001.jpg", "image_0002.jpg", "IMG_1234.JPG"])
    out = svc.build_gallery_from_uploads([str(f) for f in files], "trip", OWNER)
    assert out.ok and "3 pictures have numbered names" in out.message and "cat/1.jpg" in out.message, out.message
    # Folders keep working, without a warning: class = folder.
    monkeypatch.setenv("SBIR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(common, "load_encoder", lambda *a, **k: raw_encoder)
    _pictures(tmp_path / "byfolder", ["circle/IMG_0001.jpg", "circle/IMG_0002.jpg", "square/IMG_0003.jpg"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["index", str(tmp_path / "byfolder"), "--share", "shapes", "--checkpoint", "none", "--quiet"]) == 0
    assert "warning" not in buf.getvalue() and "3 items" in buf.getvalue(), buf.getvalue()
    gid = "class:" + re.search(r"class code:\s+(\S+)", buf.getvalue()).group(1).replace("-", "")
    assert sorted(set(svc.gallery(gid).labels)) == ["circle", "square"]
    # The same camera files through the command line: the warning is printed.
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["index", str(tmp_path / "camera"), "--share", "trip", "--checkpoint", "none", "--quiet"]) == 0
    assert "warning: 3 pictures have numbered names" in buf.getvalue(), buf.getvalue()


# ----------------------------------------------------------------------------- over HTTP, across a restart
gradio_client = pytest.importorskip("gradio_client")
app = pytest.importorskip("sbir_app", reason="the app needs gradio")
from gradio_client import handle_file  # noqa: E402


@contextlib.contextmanager
def serving(galleries: Path, encoder, base: Path):
    """The app over `galleries`, its class galleries in $SBIR_HOME/class-galleries (base/home)."""
    from sbir_core.service import RetrievalService

    service = RetrievalService(galleries, encoder=encoder, relation=None, cache_dir=base / "cache",
                               uploads_dir=base / "home" / "class-galleries")
    with serve(service) as url:
        yield url


def _strokes() -> str:
    pts = [[192 + 110 * math.cos(2 * math.pi * i / 24), 192 + 110 * math.sin(2 * math.pi * i / 24)] for i in range(25)]
    return json.dumps([pts])


def _classes(results) -> set:
    """The class names in a results grid (captions read "1. star" or "star · 0.61")."""
    return {re.sub(r"^\d+\.\s*", "", r["caption"]).split(" · ")[0] for r in results}


def _value(dropdown):
    return dropdown["value"] if isinstance(dropdown, dict) else dropdown


def test_teacher_gallery_survives_a_restart_and_only_its_owner_changes_it(app_galleries, raw_encoder, tmp_path,
                                                                         monkeypatch):
    from sbir_core.cli import common, main

    galleries = tmp_path / "galleries"
    import shutil

    shutil.copytree(app_galleries, galleries)
    monkeypatch.setenv("SBIR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(common, "load_encoder", lambda *a, **k: raw_encoder)
    # Before class: one gallery with the command line, one in the page.
    _pictures(tmp_path / "cli", ["circle/a.png", "circle/b.png", "star/c.png", "star/d.png"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["index", str(tmp_path / "cli"), "--share", "Shapes", "--checkpoint", "none", "--quiet"]) == 0
    printed = buf.getvalue()
    cli_code = re.search(r"class code:\s+(\S+)", printed).group(1)
    cli_owner = re.search(r"owner token:\s+([0-9a-f]{32})", printed).group(1)
    assert f"?class={cli_code.replace('-', '')}" in printed and ":7860/" in printed
    # The command line searches it by its code as the page does.
    (tmp_path / "drawing.json").write_text(_strokes())
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["search", "--gallery", f"class:{cli_code.lower()}", "--strokes", str(tmp_path / "drawing.json"),
                     "--k", "2", "--checkpoint", "none", "--json"]) == 0
    assert len(json.loads(buf.getvalue())) == 2
    assert main(["search", "--gallery", "class:../../etc", "--text", "x", "--checkpoint", "none"]) == 2
    files = [handle_file(str(p)) for p in _pictures(tmp_path / "page", ["star_1.png", "star_2.png", "circle_1.png"])]
    with serving(galleries, raw_encoder, tmp_path) as url:
        teacher = api_client(url)
        msg, dropdown, box, owner = teacher.predict(files, "Our shapes", False, None, api_name="/build_gallery")
        gid = _value(dropdown)
        assert "ready" in msg and re.fullmatch(r"class:[0-9A-Z]{10}", gid) and re.fullmatch(r"[0-9a-f]{32}", owner)
    code = gid.split(":")[1]

    # The server restarts (a new service and page on the same $SBIR_HOME).
    with serving(galleries, raw_encoder, tmp_path) as url:
        student = api_client(url)
        msg, dropdown = student.predict(f"{code[:5].lower()}-{code[5:].lower()}", None, api_name="/open_class")
        assert _value(dropdown) == gid and "3 images" in msg, msg
        results, status = student.predict(_strokes(), 3, gid, api_name="/search_strokes")
        assert len(results) == 3 and _classes(results) <= {"star", "circle"}
        msg, dropdown = student.predict(cli_code, None, api_name="/open_class")
        cli_gid = _value(dropdown)
        results, _ = student.predict(_strokes(), 4, cli_gid, api_name="/search_strokes")
        assert len(results) == 4

        # The student can neither delete, rename nor rebuild it.
        msg, _ = student.predict(gid, None, api_name="/delete_gallery")
        assert "Only the person who built" in msg
        msg, _ = student.predict(gid, "hacked", "f" * 32, api_name="/rename_gallery")
        assert "Only the person who built" in msg
        extra = [handle_file(str(p)) for p in _pictures(tmp_path / "student", ["square_1.png"], "square")]
        msg, dropdown, _, student_owner = student.predict(extra, "Our shapes", False, None, api_name="/build_gallery")
        assert _value(dropdown) != gid and student_owner != owner  # their own new gallery, not the teacher's
        results, status = student.predict(_strokes(), 48, gid, api_name="/search_strokes")
        assert len(results) == 3 and "square" not in _classes(results)
        msg, _ = student.predict(cli_gid, None, api_name="/delete_gallery")
        assert "Only the person who built" in msg

        # Wrong and garbage codes: one plain sentence each, the page still works.
        for bad in ("ABCDE-23456", "../../etc/passwd", str(tmp_path), "", "x" * 290, "<script>alert(1)</script>"):
            msg, dropdown = student.predict(bad, None, api_name="/open_class")
            assert msg.startswith("⚠️") and msg.count(".") <= 3 and "/" not in msg.replace("⚠️", ""), msg
            assert "Traceback" not in msg and "Error" not in msg
        # A client that never had the code cannot search the gallery by its id.
        with pytest.raises(Exception):
            api_client(url).predict(_strokes(), 3, gid, api_name="/search_strokes")

        # The teacher, from the same browser (the same owner token), deletes it.
        teacher = api_client(url)
        teacher.predict(code, owner, api_name="/open_class")
        msg, _ = teacher.predict(gid, "triangles", owner, api_name="/rename_gallery")
        assert "triangles" in msg
        msg, dropdown = teacher.predict(gid, owner, api_name="/delete_gallery")
        assert "deleted" in msg and _value(dropdown) == "default"
        results, status = student.predict(_strokes(), 3, gid, api_name="/search_strokes")
        assert results == [] and "No gallery has that class code" in status
        msg, _ = api_client(url).predict(code, None, api_name="/open_class")
        assert "No gallery has that class code" in msg
    # The command line deletes its gallery with its token, not without.
    assert main(["gallery", "delete", cli_code, "--owner", "0" * 32]) == 2
    assert main(["gallery", "delete", cli_code, "--owner", cli_owner]) == 0
    assert not (tmp_path / "home" / "class-galleries" / cli_code.replace("-", "")).exists()


# ----------------------------------------------------------------------------- the page: link, QR, load
def test_link_from_the_address_the_browser_used(app_service):
    from sbir_app.sharing import class_link, share_panel

    req = SimpleNamespace(headers={"host": "192.168.1.20:7860"}, url=SimpleNamespace(scheme="http"))
    assert class_link("ABCDE23456", req) == ("http://192.168.1.20:7860/?class=ABCDE23456", False)
    space = SimpleNamespace(headers={"host": "10.0.0.1:7860", "x-forwarded-host": "me-sketch.hf.space",
                                     "x-forwarded-proto": "https"}, url=SimpleNamespace(scheme="http"))
    assert class_link("ABCDE23456", space)[0] == "https://me-sketch.hf.space/?class=ABCDE23456"
    evil = SimpleNamespace(headers={"host": 'x"><script>alert(1)</script>'}, url=SimpleNamespace(scheme="http"))
    link, loopback = class_link("ABCDE23456", evil)
    assert "<" not in link and loopback  # an odd Host header is never echoed into the page
    local = SimpleNamespace(headers={"host": "127.0.0.1:7860"}, url=SimpleNamespace(scheme="http"))
    html = share_panel("class:ABCDE23456", "animals", True, local)
    assert "ABCDE-23456" in html and "data:image/svg+xml" in html and "--host 0.0.0.0" in html
    assert "<b>animals</b>" in html  # the builder's name, as the service gives it
    assert share_panel("default", "default", False, local) == ""


def test_page_load_with_a_class_link_chooses_the_gallery(app_galleries, raw_encoder, tmp_path):
    from sbir_core.service import RetrievalService

    svc = RetrievalService(app_galleries, encoder=raw_encoder, relation=None, cache_dir=tmp_path / "cache",
                           uploads_dir=tmp_path / "class")
    files = _pictures(tmp_path / "up", ["star_1.png", "circle_1.png"])
    out = svc.build_gallery_from_uploads([str(f) for f in files], "shapes", OWNER)
    cb = app.Callbacks(svc)
    code = out.name.split(":")[1]
    req = SimpleNamespace(query_params={"class": code}, headers={"host": "10.1.1.1:7860"})
    dd, mine, msg, status, map_image = cb.load_page("default", None, [], req)
    assert dd["value"] == out.name and mine == [out.name] and "2 images" in status and map_image is not None
    # The owner's browser lists its galleries after a reload, with no link; a stranger's does not.
    dd, *_ = cb.load_page("default", OWNER, [], SimpleNamespace(query_params={}, headers={}))
    assert (f"shapes (class {code[:5]}-{code[5:]})", out.name) in dd["choices"] and dd["value"] == "default"
    dd, *_ = cb.load_page("default", "b" * 32, [], SimpleNamespace(query_params={}, headers={}))
    assert [v for _, v in dd["choices"]] == ["default"]
    dd, mine, msg, status, map_image = cb.load_page("default", None, [], SimpleNamespace(query_params={"class": "nope"},
                                                                                      headers={}))
    assert dd["value"] == "default" and mine == [] and msg.startswith("⚠️") and "class code" in msg
