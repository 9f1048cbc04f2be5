"""The shipped checkpoints are found wherever pip installs the package (issue 34): a wheel
is built once from the checkout's files and installed with --user (a temporary user
base), --target and into a venv; from another folder, `create_encoder()` must load the
trained checkpoint from the installed package, not the checkout and not the raw backbone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from (the checkout's other files play no part in it).
BUILD_INPUTS = ("pyproject.toml", "README.md", "sbir_core/", "sbir_app/", "checkpoints/")
PROBE = ("import json, sbir_core; e = sbir_core.create_encoder(); "
         "print(json.dumps({'module': sbir_core.__file__, 'checkpoint': str(sbir_core.checkpoint_path()), "
         "'encoder_id': e.encoder_id, 'trained': e.head is not None}))")


def _source_copy(dest: Path) -> Path:
    """The files git has or would add (tracked and untracked, not ignored) that a build reads."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the wheel is built from the checkout's files")
    for name in names:
        src = ROOT / name
        if name.startswith(BUILD_INPUTS) and src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "SBIR_CHECKPOINTS", "VIRTUAL_ENV")}
    return {**env, **extra}


def _pip(*args: str, python: str = sys.executable, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    if python != sys.executable:
        cmd += ["--python", python]
    subprocess.run(cmd + list(args), check=True, env=env or _clean_env(), capture_output=True, timeout=300)


@pytest.mark.slow
def test_wheel_installs_find_the_shipped_checkpoint(tmp_path):
    from sbir_core.models.checkpoint import checkpoint_digest
    from sbir_core.paths import checkpoint_path

    if not checkpoint_path("default").is_file():
        pytest.skip("no shipped checkpoint in this checkout")
    want = checkpoint_digest(checkpoint_path("default"))
    src = _source_copy(tmp_path / "src")
    _pip("wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"))
    wheel = str(next((tmp_path / "wheel").glob("*.whl")))
    with zipfile.ZipFile(wheel) as z:  # every shipped checkpoint file (and sidecar) is package data
        shipped = {p.name for p in (src / "checkpoints").iterdir()}
        assert shipped and shipped <= {Path(n).name for n in z.namelist() if n.startswith("sbir_core/checkpoints/")}

    user = tmp_path / "userbase"
    _pip("install", "--no-deps", "--user", "--no-warn-script-location", wheel, env=_clean_env(PYTHONUSERBASE=str(user)))
    target = tmp_path / "target"
    _pip("install", "--no-deps", "--no-warn-script-location", "--target", str(target), wheel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    vpy = str(venv / "bin" / "python")
    _pip("install", "--no-deps", "--no-warn-script-location", wheel, python=vpy)

    elsewhere = tmp_path / "elsewhere"  # not the checkout: its folders must play no part
    elsewhere.mkdir()
    home = str(tmp_path / "sbir_home")
    runs = {  # where each install put the package -> how to run Python with it
        user: ([sys.executable], _clean_env(PYTHONUSERBASE=str(user), SBIR_HOME=home)),
        target: ([sys.executable], _clean_env(PYTHONPATH=str(target), SBIR_HOME=home)),
        venv: ([vpy], _clean_env(SBIR_HOME=home)),
    }
    procs = {where: subprocess.Popen(cmd + ["-c", PROBE], cwd=elsewhere, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for where, (cmd, env) in runs.items()}  # in parallel: each imports torch
    for where, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (where.name, err[-2000:])
        got = json.loads(out.strip().splitlines()[-1])
        assert Path(got["module"]).is_relative_to(where), (where.name, got)  # the installed copy ran
        assert Path(got["checkpoint"]).is_relative_to(where), (where.name, got)  # and found its own files
        assert got["trained"] and got["encoder_id"].endswith("@" + want), (where.name, got)  # not the raw backbone
