"""`finetune --out` is required and never replaces a shipped checkpoint without --force
(issue 34): before, its default was the shipped model itself."""
from __future__ import annotations

from pathlib import Path

import pytest

from sbir_core import cli
from sbir_core.paths import SHIPPED_CHECKPOINT_DIRS, checkpoint_path, shard_index

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs(monkeypatch, tmp_path):
    """finetune() replaced by a recorder: these tests train nothing and write nothing."""
    import sbir_core.training.finetune as ft

    calls = []
    monkeypatch.setattr(ft, "finetune", lambda cfg, data, out, cache=None: calls.append(out) or
                        {"best": {}, "seconds": 0.0})
    monkeypatch.setenv("SBIR_HOME", str(tmp_path / "home"))
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


def test_train_heads_out_is_guarded_too(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(checkpoint_path("default"))]) == 2
    assert "--force" in capsys.readouterr().err
