"""`FinetuneConfig`: every setting of an encoder fine-tuning run, in one dataclass (the
training loop, its data preparation and the command line read it; none of them defines it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SELECT = ("zero-shot", "zero-shot+seen")
IMAGENET_IMAGES = ("all", "photos")  # what `w_imagenet` applies to: every training image, or the photo side


@dataclass
class FinetuneConfig:
    encoder: str = "efficientnet-lite0"
    image_size: int = 160
    steps: int = 1800                # the shipped run
    photos_per_step: int = 16        # each also contributes its edge map
    sketches_per_step: int = 32
    doodle_photos_per_step: int = 8  # doodles coloured like clip-art, seen by the photo side
    lr_backbone: float = 3e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    freeze_blocks: int = 2           # stem and blocks[:freeze_blocks] stay ImageNet
    temperature: float = 0.07
    margin: float = 0.2
    w_text: float = 1.0
    w_triplet: float = 0.5
    w_pair: float = 0.5
    w_preserve: float = 0.0          # photo-photo relations of the ImageNet backbone kept (0 = off)
    # SAKE (Liu et al. 2019): the backbone keeps predicting what the frozen ImageNet model
    # predicts for every training image, sketches included, through its own ImageNet
    # classifier (0 = off); the retrieval head stays free.
    w_imagenet: float = 0.0
    imagenet_temperature: float = 2.0
    imagenet_images: str = "all"     # IMAGENET_IMAGES; "photos": doodle features may move freely
    # Share of the text-alignment target spread over the other training classes by how close
    # their names are (MiniLM cosine, softmax at semantic_temperature); 0 = one-hot targets.
    semantic_smoothing: float = 0.0
    semantic_temperature: float = 0.05
    class_text: str = "names"        # models.text.CLASS_TEXTS: class names, or names and definitions
    embed_dim: int = 256
    hidden: int = 1024
    dropout: float = 0.1
    # Exponential moving average of the weights, validated and shipped instead of the raw ones
    # (0 = off). Validation swings 0.05-0.08 between neighbouring steps; the average smooths it.
    ema: float = 0.0
    max_photos_per_class: int = 60
    val_fraction: float = 0.2
    val_every: int = 250
    seed: int = 0
    exclude: tuple = ("pacs", "doodle")
    init: Optional[str] = None       # start from this checkpoint (backbone + heads) instead of ImageNet
    # WiSE-FT: the shipped backbone is a*trained + (1-a)*ImageNet, a chosen from these on held-out classes
    interpolate: tuple = (1.0,)
    # What step selection maximises: "zero-shot" (held-out classes only; the shipped model's
    # runs used it) or "zero-shot+seen" (also held-out doodles of training classes).
    select: str = "zero-shot+seen"
    # Held-out selection classes are drawn from classes outside the product's default gallery,
    # so every gallery class QuickDraw has is trained on (False: from all classes, as the runs
    # behind the v2 checkpoint drew them). With `init`, the start's held-out classes minus those.
    heldout_outside_gallery: bool = True
    device: str = "auto"             # "auto": cuda when there is one
    workers: int = 0                 # DataLoader processes making batches (0: in the training process)
    # False: train and select the step only, and save the model searched plainly; how it searches
    # (retrieval settings, "not sure" threshold, fp16 check) is chosen later by a run with
    # `init` and no steps. For machines without faiss, e.g. a GPU machine given only the tree.
    choose_settings: bool = True
