"""The shipped model's results do not move by accident: each example drawing's top 10 on
the default gallery, as recorded (tests/golden/shipped_examples_top10.json), in the same
order, with the same similarities. A refactor that changes how settings are read, how
results are built or how strokes are parsed changes these first."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sbir_core.data.examples import list_examples
from sbir_core.models.encoders import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "shipped_examples_top10.json"

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped checkpoint")


def top10(service) -> dict[str, list[dict]]:
    """Each example's top 10 on the default gallery: paths relative to galleries/, scores."""
    out = {}
    for e in list_examples():
        o = service.search_sketch(e.render(), 10, "default")
        assert o.ok, (e.name, o.message)
        out[e.name] = [{"path": Path(h.path).resolve().relative_to(ROOT / "galleries").as_posix(),
                        "score": round(float(h.score), 5)} for h in o.hits]
    return dict(sorted(out.items()))


def test_the_examples_top_10_are_as_recorded(shipped_service):
    """shipped_service (conftest): the app's service over ROOT/galleries, loaded once a session."""
    service = shipped_service
    assert service.store.root.resolve() == (ROOT / "galleries").resolve()
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))["results"]
    got = top10(service)
    assert sorted(got) == sorted(want) == sorted(e.name for e in list_examples())
    for name in want:
        assert [r["path"] for r in got[name]] == [r["path"] for r in want[name]], name
        for g, w in zip(got[name], want[name]):
            assert g["score"] == pytest.approx(w["score"], abs=1e-3), (name, g, w)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:  # record on purpose: python -m tests.test_shipped_results --write
    from sbir_core.service import RetrievalService

    doc = json.loads(GOLDEN.read_text(encoding="utf-8"))
    doc["results"] = top10(RetrievalService(ROOT / "galleries", gallery="default", checkpoint="default", relation=None))
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
