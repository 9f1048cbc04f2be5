"""`finetune --out` is required and never replaces a shipped checkpoint without --force
(issue 34): before, its default was the shipped model itself."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sbir_core import cli
from sbir_core.cli import settings_flags
from sbir_core.paths import SHIPPED_CHECKPOINT_DIRS, checkpoint_path, shard_index
from sbir_core.training.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs(monkeypatch, tmp_path):
    """finetune() replaced by a recorder: these tests train nothing and write nothing."""
    import sbir_core.training.finetune as ft

    calls = []
    monkeypatch.setattr(ft, "finetune", lambda cfg, data, out, cache=None: calls.append(out) or
                        {"best": {}, "seconds": 0.0})
    monkeypatch.setenv("SBIR_HOME", str(tmp_path / "home"))
    (tmp_path / "splits.json").write_text("{}", encoding="utf-8")  # a data folder, as --data names one
    return calls


def _finetune(tmp_path, *flags: str) -> int:
    return cli.main(["finetune", "--data", str(tmp_path), "--cache", "", *flags])


def test_out_is_required(tmp_path, runs, capsys):
    with pytest.raises(SystemExit) as exc:
        _finetune(tmp_path)
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err and not runs


@pytest.mark.parametrize("target", [
    lambda home: checkpoint_path("default"),  # the shipped model, as the registry finds it (its shard index)
    lambda home: ROOT / "checkpoints" / "default.safetensors",  # the name the docs use
    lambda home: shard_index(ROOT / "checkpoints" / "default.safetensors"),
    lambda home: ROOT / "checkpoints" / "default-00001-of-00002.safetensors",
    lambda home: ROOT / "checkpoints" / "mine.safetensors",  # anything in the shipped folder
    lambda home: SHIPPED_CHECKPOINT_DIRS[1] / "default.safetensors",  # an installed package's data
    lambda home: home / "checkpoints" / "default.safetensors",  # a registry file where names are looked up
])
def test_shipped_checkpoints_are_refused_without_force(tmp_path, runs, capsys, target):
    out = target(tmp_path / "home")
    assert _finetune(tmp_path, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "shipped checkpoint" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not runs  # refused before any data was read
    assert _finetune(tmp_path, "--out", str(out), "--force") == 0 and runs == [out]


def test_other_paths_are_written_as_asked(tmp_path, runs):
    for out in (tmp_path / "run.safetensors", tmp_path / "home" / "checkpoints" / "mine.safetensors"):
        assert _finetune(tmp_path, "--out", str(out)) == 0
    assert runs == [tmp_path / "run.safetensors", tmp_path / "home" / "checkpoints" / "mine.safetensors"]


def test_the_legacy_heads_only_trainer_is_gone(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", "x"])
    assert "invalid choice: 'train'" in capsys.readouterr().err
    assert not (ROOT / "sbir_core" / "training" / "train.py").exists()


@pytest.fixture
def configs(monkeypatch, tmp_path):
    """The FinetuneConfig each run would train with (nothing is trained)."""
    import sbir_core.training.finetune as ft

    seen = []
    monkeypatch.setattr(ft, "finetune", lambda cfg, data, out, cache=None: seen.append(cfg) or
                        {"best": {}, "seconds": 0.0})
    (tmp_path / "splits.json").write_text("{}", encoding="utf-8")
    return seen


def _recipe(tmp_path, **settings) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(settings), encoding="utf-8")
    return str(path)


def test_every_setting_is_a_flag_with_its_help_and_default_shown_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside a help text
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    helps = settings_flags.field_help(FinetuneConfig)
    assert helps["ema"].endswith("e.g. 0.998 (0: off)") and "SAKE" not in helps["w_preserve"]  # continued, not leaked
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(helps[f.name].split()) in text, f.name  # the field's own help
        if f.default is not None and f.default is not False:
            assert text.count(f"(default: {f.default})") >= 1, f.name
        assert "(default" not in helps[f.name].lower(), f.name  # argparse shows it, once
    assert text.count("(default: 1800)") == 1 and "(default: None)" not in text


def test_a_recipe_sets_fields_and_flags_override_it(tmp_path, configs):
    recipe = _recipe(tmp_path, steps=7, w_triplet=0, exclude=["pacs"], interpolate=[1, 0.8],
                     heldout_outside_gallery=False, init=None)
    assert cli.main(["finetune", "--data", str(tmp_path), "--out", str(tmp_path / "o.safetensors"), "--cache", "",
                     "--recipe", recipe, "--steps", "9", "--interpolate", "0.9", "0.7", "--choose-settings"]) == 0
    cfg, default = configs[0], FinetuneConfig()
    assert (cfg.steps, cfg.w_triplet, cfg.exclude, cfg.interpolate) == (9, 0, ("pacs",), (0.9, 0.7))
    assert cfg.heldout_outside_gallery is False and cfg.choose_settings is True  # recipe kept; flag given
    assert (cfg.lr_backbone, cfg.w_text) == (default.lr_backbone, default.w_text)  # named by neither: defaults
    # a flag left at its default does not undo the recipe
    assert cli.main(["finetune", "--data", str(tmp_path), "--out", str(tmp_path / "o.safetensors"), "--cache", "",
                     "--recipe", _recipe(tmp_path, seed=3, select="zero-shot")]) == 0
    assert (configs[1].seed, configs[1].select) == (3, "zero-shot")
    assert cli.main(["finetune", "--data", str(tmp_path), "--out", str(tmp_path / "o.safetensors"), "--cache", "",
                     "--recipe", _recipe(tmp_path, heldout_outside_gallery=False),
                     "--heldout-outside-gallery"]) == 0
    assert configs[2].heldout_outside_gallery is True


@pytest.mark.parametrize("settings, error", [
    ({"stpes": 7}, "unknown setting(s) stpes"),
    ({"steps": "7"}, "steps must be int"),
    ({"w_text": True}, "w_text must be float"),
    ({"exclude": "pacs"}, "exclude must be a list of str"),
    ({"ema": 1.0}, "ema takes a decay in [0, 1)"),
    ({"select": "best"}, "select takes one of zero-shot, zero-shot+seen"),
])
def test_a_bad_recipe_is_one_error_line_before_any_data_is_read(tmp_path, configs, capsys, settings, error):
    assert cli.main(["finetune", "--data", str(tmp_path), "--out", str(tmp_path / "o.safetensors"), "--cache", "",
                     "--recipe", _recipe(tmp_path, **settings)]) == 2
    err = capsys.readouterr().err.strip()
    assert error in err and len(err.splitlines()) == 1 and not configs
