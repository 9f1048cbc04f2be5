"""Everything the page does, the command line does: strokes, named galleries, photo
explanations, re-ranking, listing galleries, serving. Same answers as the app's service."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sbir_core import cli

ROOT = Path(__file__).resolve().parents[1]
# A circle drawn as the page sends it (points on a 384 px canvas).
CIRCLE = [[[192 + 120 * __import__("math").cos(t / 20 * 6.283), 192 + 120 * __import__("math").sin(t / 20 * 6.283)]
           for t in range(21)]]
SQUARE = [[[80, 80], [300, 80], [300, 300], [80, 300], [80, 80]]]


@pytest.fixture()
def use_raw_encoder(monkeypatch, raw_encoder):
    monkeypatch.setattr(cli.common, "load_encoder", lambda name, checkpoint: raw_encoder)


def _json_results(capsys) -> list[dict]:
    return json.loads(capsys.readouterr().out)


def test_search_strokes_by_gallery_name_matches_the_app(app_galleries, app_service, use_raw_encoder, tmp_path,
                                                         capsys) -> None:
    strokes = tmp_path / "circle.json"
    strokes.write_text(json.dumps({"strokes": CIRCLE}))
    rc = cli.main(["search", "--gallery", "default", "--galleries", str(app_galleries), "--checkpoint", "none",
                   "--strokes", str(strokes), "--k", "5", "--json"])
    assert rc == 0
    got = _json_results(capsys)
    app = app_service.search_sketch(CIRCLE, 5, gallery="default")
    assert app.ok and [Path(r["path"]).name for r in got] == [Path(h.path).name for h in app.hits]
    assert [round(r["score"], 4) for r in got] == [round(h.score, 4) for h in app.hits]


def test_search_quickdraw_ndjson_line(app_galleries, use_raw_encoder, tmp_path, capsys) -> None:
    nd = tmp_path / "shapes.ndjson"
    rows = [{"word": w, "drawing": [[[p[0] for p in s], [p[1] for p in s]] for s in d]}
            for w, d in (("circle", CIRCLE), ("square", SQUARE))]
    nd.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    folder = str(app_galleries / "default")
    for line in (0, 1):
        assert cli.main(["search", "--gallery", folder, "--strokes", str(nd), "--line", str(line), "--k", "3",
                         "--json"]) == 0
        assert len(_json_results(capsys)) == 3
    assert cli.main(["search", "--gallery", folder, "--strokes", str(nd), "--line", "7"]) == 2
    assert "there is no number 7" in capsys.readouterr().err


def test_unknown_gallery_name_lists_the_known_ones(app_galleries, use_raw_encoder, capsys) -> None:
    assert cli.main(["search", "--gallery", "nope", "--galleries", str(app_galleries), "--checkpoint", "none",
                     "--text", "cat"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "default" in err


def test_rerank_returns_k_results_in_a_new_order(app_galleries, use_raw_encoder, tmp_path, capsys) -> None:
    strokes = tmp_path / "square.json"
    strokes.write_text(json.dumps(SQUARE))
    base = ["search", "--gallery", str(app_galleries / "default"), "--strokes", str(strokes), "--k", "4", "--json"]
    assert cli.main(base) == 0
    plain = _json_results(capsys)
    assert cli.main(base + ["--rerank"]) == 0
    reranked = _json_results(capsys)
    assert len(reranked) == 4
    assert [r["score"] for r in reranked] == sorted((r["score"] for r in reranked), reverse=True)
    assert {r["path"] for r in reranked} <= {r["path"] for r in plain} | set(
        str(p) for p in (app_galleries.parent / "shapes").rglob("*.png"))
    assert cli.main(["search", "--gallery", str(app_galleries / "default"), "--text", "x", "--rerank"]) == 2


def test_explain_a_photo_query(app_galleries, raw_encoder, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(cli.explain, "explain_encoder", lambda checkpoint: raw_encoder)
    shapes = app_galleries.parent / "shapes"
    q, p = shapes / "circle" / "circle_0.png", shapes / "circle" / "circle_1.png"
    assert cli.main(["explain", "--query-photo", str(q), "--photo", str(p), "--out", str(tmp_path / "o"),
                     "--relation", "none"]) == 0
    for name in ("correspondences.png", "heatmap.png", "synthesis.png"):
        assert (tmp_path / "o" / name).stat().st_size > 1000


def test_gallery_list_reads_metadata_only(app_galleries) -> None:
    code = ("import sys, json; from sbir_core.cli import main; "
            f"main(['gallery', 'list', '--galleries', {str(app_galleries)!r}, '--json']); "
            "print('torch' in sys.modules, file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["default"]["count"] == 12 and rows["default"]["classes"] == 4
    assert res.stderr.strip().splitlines()[-1] == "False"  # no model was loaded


def test_serve_passes_its_arguments_to_the_app(capsys) -> None:
    pytest.importorskip("gradio")
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--", "--help"])
    assert exc.value.code == 0 and "--port" in capsys.readouterr().out


def test_bugs_keep_their_traceback(monkeypatch) -> None:
    def broken(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli.galleries, "_cmd_gallery_list", broken)
    with pytest.raises(KeyError):
        cli.main(["gallery", "list"])
