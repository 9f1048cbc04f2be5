"""`FinetuneConfig`: every setting of an encoder fine-tuning run, in one dataclass (the
training loop, its data preparation and the command line read it; none of them defines it).

Each field's help is its trailing comment (continued on the comment lines aligned under it;
comments above a field are notes for whoever edits it): `finetune`'s flags are generated
from these fields (`cli.settings_flags`), and a JSON recipe (`finetune --recipe`) names the
same fields."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sbir_core.errors import InputError

SELECT = ("zero-shot", "zero-shot+seen")
IMAGENET_IMAGES = ("all", "photos")  # what `w_imagenet` applies to: every training image, or the photo side
# The fields with a fixed set of values, and those values (the command line offers them as choices).
CHOICES = {"select": SELECT, "imagenet_images": IMAGENET_IMAGES}


@dataclass
class FinetuneConfig:
    encoder: str = "efficientnet-lite0"  # backbone to fine-tune
    image_size: int = 160  # input size of photos and sketches, in pixels
    # 1800: the shipped run
    steps: int = 1800  # training steps (0 with --init: only choose how it searches)
    photos_per_step: int = 16  # photos per step (each also contributes its edge map)
    sketches_per_step: int = 32  # doodles per step
    doodle_photos_per_step: int = 8  # doodles coloured like clip-art, on the photo side, per step
    lr_backbone: float = 3e-4  # learning rate of the backbone
    lr_head: float = 1e-3  # learning rate of the heads
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup: int = 100  # learning-rate warm-up steps
    freeze_blocks: int = 2  # the stem and this many first blocks stay ImageNet
    temperature: float = 0.07  # softmax temperature of the text alignment and the photo <-> edge map term, in (0, 1]
    margin: float = 0.2  # margin of the cross-modal triplet loss
    w_text: float = 1.0  # weight of aligning sketches and photos to their class-name text (MA-SBIR)
    w_triplet: float = 0.5  # weight of the cross-modal sketch-photo triplet loss (ZSCMR)
    w_pair: float = 0.5  # weight of matching each photo with its own edge map among the batch
    w_preserve: float = 0.0  # weight of keeping the ImageNet backbone's photo-to-photo relations (0: off)
    # SAKE (Liu et al. 2019): the backbone keeps predicting what the frozen ImageNet model
    # predicts, sketches included, through its own ImageNet classifier; the retrieval head stays free.
    w_imagenet: float = 0.0  # weight of keeping the ImageNet model's class predictions on every training image (SAKE;
                             # 0: off)
    imagenet_temperature: float = 2.0  # softmax temperature of the ImageNet-prediction term
    imagenet_images: str = "all"  # which training images --w-imagenet applies to (photos: doodle features may move
                                  # freely)
    semantic_smoothing: float = 0.0  # share of the text-alignment target given to the other training classes by how
                                     # close their names are (MiniLM cosine; 0: one-hot)
    semantic_temperature: float = 0.05  # softmax temperature of --semantic-smoothing
    class_text: str = "names"  # what each class's text is: its name in prompts, or also its WordNet definition
                               # (sbir_core/models/class_glosses.json)
    embed_dim: int = 256  # size of the retrieval embedding
    hidden: int = 1024  # hidden width of the heads
    dropout: float = 0.1  # dropout in the heads
    # Validation swings 0.05-0.08 between neighbouring steps; the average smooths it.
    ema: float = 0.0  # validate and keep an exponential moving average of the weights with this decay, in [0, 1),
                      # e.g. 0.998 (0: off)
    max_photos_per_class: int = 60  # training photos per class
    val_fraction: float = 0.2  # share of training classes held out to choose the step
    val_every: int = 250  # steps between validations
    seed: int = 0  # random seed
    exclude: tuple[str, ...] = ("pacs", "doodle")  # benchmark splits never trained on
    init: Optional[str] = None  # continue from this checkpoint (backbone and heads) instead of ImageNet
    interpolate: tuple[float, ...] = (1.0,)  # WiSE-FT: backbone weights a*trained + (1-a)*ImageNet, a in (0, 1]
                                             # chosen from these on held-out classes (1: off); with --init and --steps
                                             # 0, applied to a trained checkpoint
    select: str = "zero-shot+seen"  # what picks the step: held-out classes only (the shipped model's runs), or also
                                    # held-out doodles of training classes
    heldout_outside_gallery: bool = True  # draw the held-out selection classes from classes outside the default
                                          # gallery, so every gallery class is trained on (off: from all classes, as
                                          # the v2 checkpoint was trained); with --init, the start's held-out classes
                                          # less those
    device: str = "auto"  # torch device to train on (auto: cuda when there is one, else cpu)
    workers: int = 0  # processes that make the batches (0: the training process; on a GPU machine, its CPU cores)
    choose_settings: bool = True  # after training, choose how the model searches (retrieval settings, fp16 check);
                                  # off: save it searched plainly and choose later with --init OUT --steps 0 (for a
                                  # machine without faiss, e.g. a lent GPU)

    def __post_init__(self) -> None:
        # checked before data preparation, which takes minutes
        if not 0.0 < self.temperature <= 1.0:
            raise InputError(f"temperature takes a value in (0, 1] like 0.07, not {self.temperature}")
        if not 0.0 <= self.ema < 1.0:
            raise InputError(f"ema takes a decay in [0, 1) like 0.998 (0: off), not {self.ema}")
        if not self.interpolate or not all(0.0 < a <= 1.0 for a in self.interpolate):
            raise InputError(f"interpolate takes weights in (0, 1] like 1 0.8 0.6, not {self.interpolate}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} takes one of {', '.join(allowed)}, not {getattr(self, name)!r}")
