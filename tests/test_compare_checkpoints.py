"""scripts/compare_checkpoints.py: the side-by-side table docs/EXPERIMENTS.md uses for retrains
(the measuring itself is `eval.product`'s and `eval`'s, tested with them)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scripts_loader import load_script


@pytest.fixture(scope="module")
def compare():
    return load_script("compare_checkpoints")


def test_one_column_per_checkpoint_one_row_per_measure(compare):
    a = {"pacs": {"hit@1": 0.5, "hit@5": 0.8, "P@5": 0.45, "mAP@all": 0.4},
         "pacs embedding alone": {"hit@1": 0.4, "hit@5": 0.7, "P@5": 0.4, "mAP@all": 0.39},
         "example sketches in the top 5": {"found": 10, "of": 11, "misses": ["fish"]}}
    b = {"pacs": {"hit@1": 0.25, "hit@5": 0.5, "P@5": 0.3, "mAP@all": 0.5},
         "pacs embedding alone": {"hit@1": 0.2, "hit@5": 0.6, "P@5": 0.3, "mAP@all": 0.41},
         "example sketches in the top 5": {"found": 11, "of": 11, "misses": []}}
    lines = compare.table({"default": a, "v3.safetensors": b}).splitlines()
    assert lines[0].endswith("| `default` | `v3.safetensors` |") and len(lines) == 2 + 3
    assert lines[2] == "| pacs | 0.500 / 0.800 / 0.450 / 0.400 | 0.250 / 0.500 / 0.300 / 0.500 |"
    assert lines[4] == "| example sketches in the top 5 | 10 of 11 (fish missed) | 11 of 11 |"


def test_differences_are_paired_query_by_query_against_the_first_checkpoint(compare):
    def row(hits, aps):
        return {"hit@1": 0.0, "hit@5": float(np.mean(hits)), "P@5": 0.0, "mAP@all": float(np.mean(aps)),
                "per_query": {"hit@5": np.array(hits, float), "mAP@all": np.array(aps, float)}}

    examples = {"found": 10, "of": 11, "misses": ["fish"]}
    base = {"pacs": row([1, 0, 0, 1], [0.5, 0.1, 0.2, 0.4]), "example sketches in the top 5": examples}
    new = {"pacs": row([1, 1, 1, 0], [0.5, 0.3, 0.4, 0.4]), "example sketches in the top 5": examples}
    diffs = compare.differences({"default": base, "new": new})
    assert list(diffs) == ["pacs"]  # rows without per-query figures are not compared
    h, a = diffs["pacs"]["new"]["hit@5"], diffs["pacs"]["new"]["mAP@all"]
    assert (h["better"], h["worse"], h["diff"]) == (2, 1, 0.25)
    assert a["diff"] == pytest.approx(0.1) and a["better"] == 2 and a["worse"] == 0
    lines = compare.difference_table(diffs, "default").splitlines()
    assert lines[0].startswith("| against `default`") and lines[0].endswith("| `new` |")
    assert lines[2].startswith("| pacs | +0.250 ± ") and "(+2 / -1), +0.100 ± " in lines[2]


def test_bad_arguments_are_refused_before_a_model_loads(compare, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--data", str(tmp_path), "default"])
    assert exc.value.code == 2 and "splits.json not found" in capsys.readouterr().err
    (tmp_path / "splits.json").write_text(json.dumps({}))
    with pytest.raises(SystemExit) as exc:
        compare.main(["--data", str(tmp_path), "default", str(tmp_path / "absent.safetensors")])
    assert exc.value.code == 2 and "no checkpoint file" in capsys.readouterr().err
