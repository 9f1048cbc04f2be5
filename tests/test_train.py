import numpy as np
import pytest
import torch

from sbir_core.models.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from sbir_core.training.train import LOSSES, FeatureSet, Trainer, TrainConfig, split_classes

torch.set_num_threads(1)


def synthetic(n_cls=12, dim=48, seed=0):
    """Class-structured fake backbone features: photos and sketches of a class share a
    direction, each modality has its own offset (the modality gap)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_cls, dim))
    gap = rng.normal(size=dim) * 3
    yp = np.repeat(np.arange(n_cls), 20)
    ys = np.repeat(np.arange(n_cls), 20)
    photo = centers[yp] + rng.normal(scale=0.8, size=(len(yp), dim))
    sketch = centers[ys] + gap + rng.normal(scale=0.8, size=(len(ys), dim))
    edges = centers[yp] + gap + rng.normal(scale=0.8, size=(len(yp), dim))
    fs = FeatureSet(photo=photo.astype(np.float16), photo_edges=[edges.astype(np.float16)],
                    sketch=[sketch.astype(np.float16)], photo_labels=yp, sketch_labels=ys,
                    classes=[f"c{i}" for i in range(n_cls)])
    text = torch.nn.functional.normalize(torch.from_numpy(centers[:, :16]).float(), dim=-1)
    return fs, text


def small_cfg(**losses):
    cfg = TrainConfig(embed_dim=16, hidden=32, steps=60, batch=64, eval_every=20, patience=10, dropout=0.0)
    cfg.losses.update(losses)
    return cfg


def test_every_recipe_loads_and_names_known_losses():
    for name in ("default", "ma-sbir", "zscmr"):
        cfg = TrainConfig.from_recipe(name)
        assert set(cfg.losses) == set(LOSSES) and any(cfg.losses.values())
    with pytest.raises(FileNotFoundError, match="known"):
        TrainConfig.from_recipe("nope")


def test_heldout_classes_cover_both_sides():
    fs, _ = synthetic()
    held = split_classes(fs, 0.25, seed=0)
    assert 0 < held.sum() < len(held)


@pytest.mark.parametrize("losses", [
    {"text": 1.0, "center": 0.5, "recon": 0.5, "disc": 0.1},
    {"latent": 1.0, "triplet": 1.0, "decoder": 0.5, "cls": 1.0},
    {"pair": 1.0, "xclass": 1.0},
])
def test_training_improves_heldout_retrieval(losses):
    fs, text = synthetic()
    held = split_classes(fs, 0.25, seed=0)
    trainer = Trainer(small_cfg(**losses), fs, text, held)
    before = trainer.validate()
    result = trainer.fit(progress=False)
    assert result["val_mAP"] >= before
    assert result["val_mAP"] > 0.5  # held-out classes separate after removing the gap


def test_switched_off_losses_are_not_computed():
    fs, text = synthetic()
    trainer = Trainer(small_cfg(text=1.0), fs, text, split_classes(fs, 0.25, 0))
    assert set(trainer.step()) == {"text"}


def test_checkpoint_round_trip(tmp_path):
    fs, text = synthetic()
    trainer = Trainer(small_cfg(text=1.0), fs, text, split_classes(fs, 0.25, 0))
    trainer.fit(progress=False)
    path = save_checkpoint(tmp_path / "m.safetensors", trainer.head, {"encoder": "efficientnet-lite0", "val_mAP": 0.5})
    head, meta = load_checkpoint(path)
    assert meta["encoder"] == "efficientnet-lite0" and read_metadata(path)["val_mAP"] == 0.5
    x = torch.randn(3, fs.photo.shape[1])
    # Weight matrices come back rounded to fp16, vectors (biases, statistics) exactly.
    for k, v in trainer.head.state_dict().items():
        assert torch.equal(head.state_dict()[k], v.half().float() if v.dim() >= 2 else v), k
    a, b = head(x, "sketch"), trainer.head.eval()(x, "sketch")
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9999
    with pytest.raises(ValueError, match="encoder"):
        save_checkpoint(tmp_path / "bad.safetensors", trainer.head, {})


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(bad)
