"""`RetrievalSettings`: a checkpoint's meta["retrieval"] parsed once, typed and checked, and
read through `SBIREncoder.retrieval` only (issue 34)."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from sbir_core.errors import InputError
from sbir_core.models.checkpoint import read_metadata
from sbir_core.models.encoders import DEFAULT_CHECKPOINT
from sbir_core.models.settings import PLAIN_SEARCH, RetrievalSettings, SeenCalibrationSetting

PKG = Path(__file__).resolve().parents[1] / "sbir_core"


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped checkpoint")
def test_the_shipped_checkpoint_parses_to_what_it_was_validated_with():
    stored = read_metadata(DEFAULT_CHECKPOINT)["retrieval"]
    s = RetrievalSettings.from_meta(stored)
    assert s == RetrievalSettings(edge_weight=0.0, diffusion_k=3, flip_sketch=True,
                                  seen_calibration=SeenCalibrationSetting(tau=0.15, beta=0.75))
    merged = s.merged_into(stored)
    assert merged == stored  # nothing lost or changed: the records (validation, confidence) are kept as written


def test_plain_search_is_the_default_and_beta_zero_is_off():
    assert RetrievalSettings.from_meta(None) == RetrievalSettings.from_meta({}) == PLAIN_SEARCH
    off = RetrievalSettings.from_meta({"seen_calibration": {"tau": 0.1, "beta": 0}})
    assert off.seen_calibration is None and off.as_dict()["seen_calibration"] is None


@pytest.mark.parametrize("stored, error", [
    ({"diffusion_K": 3}, "unknown checkpoint retrieval setting(s) diffusion_K"),
    ({"diffusion_k": -1}, "diffusion_k must be a whole number >= 0"),
    ({"diffusion_k": 2.5}, "diffusion_k must be a whole number >= 0"),
    ({"flip_sketch": "yes"}, "flip_sketch must be true or false"),
    ({"edge_weight": 1.5}, "edge_weight must be in [0, 1)"),
    ({"edge_weight": float("nan")}, "edge_weight must be in [0, 1)"),
    ({"seen_calibration": {"tau": 0, "beta": 1}}, "seen_calibration needs tau > 0"),
    ({"seen_calibration": {"tau": 0.1}}, "seen_calibration must be"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_settings_say_which_and_why(stored, error):
    with pytest.raises(InputError, match=re.escape(error)):
        RetrievalSettings.from_meta(stored)


def test_the_encoder_reads_and_writes_its_settings_through_one_property(raw_encoder):
    enc = raw_encoder
    saved = dict(enc.meta)
    try:
        assert enc.retrieval == PLAIN_SEARCH  # a raw backbone searches plainly
        enc.meta["retrieval"] = {"diffusion_k": 5, "flip_sketch": True, "validation": {"x": 1}}
        assert enc.retrieval.diffusion_k == 5 and enc.retrieval.flip_sketch
        enc.retrieval = dataclasses.replace(enc.retrieval, flip_sketch=False)
        assert enc.meta["retrieval"] == {"validation": {"x": 1}, **dataclasses.replace(
            PLAIN_SEARCH, diffusion_k=5).as_dict()}
        enc.meta["retrieval"] = {"flip_sketch": 1}
        with pytest.raises(InputError, match="flip_sketch"):
            enc.retrieval  # noqa: B018
        with pytest.raises(InputError, match="no sketch head"):
            enc.retrieval = RetrievalSettings(edge_weight=0.5)
    finally:
        enc.meta.clear()
        enc.meta.update(saved)


def test_a_checkpoint_with_bad_settings_fails_at_load(tmp_path):
    from sbir_core.models.checkpoint import save_checkpoint
    from sbir_core.models.encoders import create_encoder
    from sbir_core.models.heads import SBIRHead

    head = SBIRHead(1280 + 112 + 320 + 704, 384, 32, 64)
    path = save_checkpoint(tmp_path / "c.safetensors", head, {"encoder": "efficientnet-lite0",
                                                             "retrieval": {"difusion_k": 3}})
    with pytest.raises(InputError, match="difusion_k"):
        create_encoder(checkpoint=str(path))
    head.photo_edge_weight = 0.25
    head.config["photo_edge_weight"] = 0.25
    path = save_checkpoint(tmp_path / "d.safetensors", head, {"encoder": "efficientnet-lite0",
                                                             "retrieval": {"edge_weight": 0.5}})
    with pytest.raises(InputError, match="disagrees with itself"):
        create_encoder(checkpoint=str(path))


def _retrieval_key_uses(path: Path) -> list[int]:
    """Lines of `path` that index or .get() the key "retrieval" (code, not prose)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        key = None
        if isinstance(node, ast.Subscript):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "get", "setdefault", "pop") and node.args:
            key = node.args[0]
        if isinstance(key, ast.Constant) and key.value == "retrieval":
            lines.append(node.lineno)
    return lines


def test_nothing_but_the_encoder_reads_the_metadata_dict():
    readers = {str(p.relative_to(PKG)): _retrieval_key_uses(p) for p in sorted(PKG.rglob("*.py"))}
    readers = {m: n for m, n in readers.items() if n}
    assert set(readers) == {"models/encoders.py"}, readers  # training writes it as a dict literal
