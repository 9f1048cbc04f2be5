"""The command line stays fast to start and is the only place that knows argparse.

Everything here runs `python` in a subprocess (a fresh interpreter, so what the
parser imports is measured, not what other tests already loaded) and loads no model.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sbir_core import cli

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("index", "search", "eval", "finetune", "train-relation", "eval-relation", "explain",
               "map", "gallery")


def _python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=check)


def test_help_loads_nothing_heavy_and_lists_every_subcommand() -> None:
    """`--help` answers at once because it imports no torch, numpy, PIL, faiss or gradio
    (how long it takes: scripts/bench_startup.py)."""
    code = ("import runpy, sys\nsys.argv = ['sbir', '--help']\n"
            "try:\n    runpy.run_module('sbir_core', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('loaded:', [m for m in ('torch', 'numpy', 'PIL', 'faiss', 'gradio') if m in sys.modules])")
    out = _python("-c", code).stdout
    for name in SUBCOMMANDS:
        assert name in out, name
    assert out.strip().splitlines()[-1] == "loaded: []", out.strip().splitlines()[-1]


def test_building_the_parser_does_not_import_torch() -> None:
    code = "import sys; from sbir_core.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert _python("-c", code).stdout.strip() == "False"


def test_unknown_split_is_one_error_line(tmp_path) -> None:
    (tmp_path / "splits.json").write_text(json.dumps({"pacs": {"unseen_classes": ["cat"]}}))
    res = _python("-m", "sbir_core", "eval", "--data", str(tmp_path), "--split", "nope", "--checkpoint", "none",
                  check=False)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown split 'nope'"), res.stderr


@pytest.mark.parametrize("flags, error", [
    (["--interpolate", "0.8", "x"], "finetune: error: argument --interpolate: invalid float value: 'x'"),
    (["--interpolate", "0.5", "1.5"], "error: interpolate takes weights in (0, 1]"),
    (["--ema", "1"], "error: ema takes a decay in [0, 1)"),
    (["--ema", "-0.5"], "error: ema takes a decay in [0, 1)"),
    (["--temperature", "0"], "error: temperature takes a value in (0, 1]"),
    (["--select", "best"], "finetune: error: argument --select: invalid choice: 'best'"),
])
def test_bad_finetune_values_are_one_error_line(tmp_path, capsys, flags: list, error: str) -> None:
    """Refused before any data is read or any model built. In this process (the entry point's
    exit code and stderr through a real `python -m sbir_core`: test_unknown_split_is_one_error_line)."""
    try:
        code = cli.main(["finetune", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o"), *flags])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert error in stderr.strip().splitlines()[-1], stderr


def test_finetune_flags_reach_the_training_config(tmp_path, monkeypatch) -> None:
    """Each recipe flag (the ablation's variants among them) sets its FinetuneConfig field."""
    import sbir_core.training.finetune as ft

    seen = {}
    monkeypatch.setattr(ft, "finetune", lambda cfg, data, out, cache=None: seen.update(cfg=cfg) or
                        {"best": {}, "seconds": 0.0})
    (tmp_path / "splits.json").write_text("{}", encoding="utf-8")
    assert cli.main(["finetune", "--data", str(tmp_path), "--out", str(tmp_path / "o.safetensors"),
                     "--w-text", "0.25", "--w-triplet", "0", "--w-pair", "0.75", "--w-preserve", "0.5",
                     "--w-imagenet", "1.5", "--imagenet-images", "photos",
                     "--semantic-smoothing", "0.2", "--doodle-photos-per-step", "0", "--steps", "7", "--ema", "0.998",
                     "--temperature", "0.15", "--no-choose-settings"]) == 0
    cfg, default = seen["cfg"], ft.FinetuneConfig()
    assert (cfg.w_text, cfg.w_triplet, cfg.w_pair, cfg.w_preserve) == (0.25, 0.0, 0.75, 0.5)
    assert (cfg.doodle_photos_per_step, cfg.steps, cfg.semantic_smoothing, cfg.ema) == (0, 7, 0.2, 0.998)
    assert cfg.temperature == 0.15 and cfg.w_imagenet == 1.5 and default.w_imagenet == 0.0
    assert (cfg.imagenet_images, default.imagenet_images) == ("photos", "all")
    assert default.choose_settings and not cfg.choose_settings
    assert (cfg.lr_backbone, cfg.margin) == (default.lr_backbone, default.margin)  # unnamed: defaults


# The parser mirrors a few library constants so that it imports no library module;
# read the originals from the source (importing those modules would load torch).
@pytest.mark.parametrize("module, name, mirror", [
    ("gallery/ann", "REQUESTABLE", "INDEX_TYPES"),
    ("gallery/format", "GALLERY_MODALITIES", "GALLERY_MODALITIES"),
    ("models/relation", "DEFAULT_TOPK", "RELATION_TOPK"),
    ("models/text", "CLASS_TEXTS", "CLASS_TEXTS"),
    ("data/datasets", "DATA_HELP", "DATA_HELP"),
])
def test_mirrored_constants_match_the_library(module: str, name: str, mirror: str) -> None:
    tree = ast.parse((ROOT / "sbir_core" / f"{module}.py").read_text(encoding="utf-8"))
    values = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)]
    assert values == [getattr(cli.common, mirror)], f"sbir_core.{module}.{name} changed: update cli.common.{mirror}"


def test_finetune_offers_the_backbones_the_library_loads() -> None:
    tree = ast.parse((ROOT / "sbir_core" / "models" / "encoders.py").read_text(encoding="utf-8"))
    packages = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "LITE_PACKAGES" for t in node.targets)]
    assert tuple(packages[0]) == cli.common.LITE_BACKBONES


def test_only_the_cli_package_uses_argparse() -> None:
    for path in sorted((ROOT / "sbir_core").rglob("*.py")):
        if path.parent.name != "cli":
            text = path.read_text(encoding="utf-8")
            assert "argparse" not in text and "register_cli" not in text, path.name
