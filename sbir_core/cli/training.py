"""`train` (heads on cached features), `finetune` (the encoder end to end) and the relation
model's `train-relation` / `eval-relation`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sbir_core.cli import common
from sbir_core.paths import cache_dir, checkpoint_path, is_shipped_checkpoint


def _out(arg: str, force: bool) -> Path:
    """--out, refused when it would replace a shipped checkpoint (unless --force): a run
    that writes there by mistake would silently change what every user gets."""
    if is_shipped_checkpoint(arg) and not force:
        raise common.CLIError(f"--out {arg} would overwrite a shipped checkpoint; write somewhere else, "
                              "or add --force to replace it on purpose")
    return Path(arg)


def _cmd_train(args: argparse.Namespace) -> int:
    from sbir_core.training.train import LOSSES, TrainConfig, train

    out = None if args.out == "none" else _out(args.out, args.force)

    cfg = TrainConfig.from_recipe(args.recipe)
    for kv in args.loss or []:
        k, _, v = kv.partition("=")
        if k not in LOSSES:
            raise ValueError(f"unknown loss {k!r}; known: {', '.join(LOSSES)}")
        cfg.losses[k] = float(v)
    for name in ("steps", "seed", "lr", "batch", "photo_edge_weight", "embed_dim", "hidden"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    if args.encoder:
        cfg.encoder = args.encoder
    if args.exclude_split:
        cfg.exclude = tuple(args.exclude_split)
    if args.no_edges:
        cfg.use_edges = False
    res = train(cfg, Path(args.data), out)
    summary = {k: res[k] for k in ("val_mAP", "best_step", "diffusion_k", "val_mAP_by_diffusion", "benchmarks",
                                   "data_fingerprint", "seconds")}
    print(json.dumps(summary, indent=1))
    if out:
        print(f"saved {out}")
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train the heads on cached backbone features")
    p.add_argument("--data", required=True, help="shared data folder (splits.json, caltech101, quickdraw)")
    p.add_argument("--recipe", default="default", help="recipe name in sbir_core/recipes or a JSON path")
    p.add_argument("--out", default="none",
                   help="checkpoint path, or 'none' (default: print the scores only; the shipped model comes "
                        "from `finetune`, so this never overwrites it by accident)")
    p.add_argument("--force", action="store_true", help="let --out replace a shipped checkpoint")
    p.add_argument("--loss", action="append", metavar="NAME=WEIGHT",
                   help=f"override a loss weight ({', '.join(common.TRAIN_LOSSES)})")
    p.add_argument("--exclude-split", action="append", help="benchmark split never to train on (repeatable)")
    p.add_argument("--encoder", help="backbone, e.g. efficientnet-lite2")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch", type=int)
    p.add_argument("--embed-dim", dest="embed_dim", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--photo-edge-weight", dest="photo_edge_weight", type=float)
    p.add_argument("--no-edges", action="store_true", help="no photo edge maps as pseudo-sketches")
    p.set_defaults(func=_cmd_train)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from sbir_core.training.config import FinetuneConfig
    from sbir_core.training.finetune import finetune

    out = _out(args.out, args.force)  # before data preparation, which takes minutes
    cfg = FinetuneConfig()
    for name in ("steps", "image_size", "lr_backbone", "lr_head", "freeze_blocks", "seed", "val_every",
                 "sketches_per_step", "photos_per_step", "doodle_photos_per_step", "max_photos_per_class",
                 "warmup", "init", "w_text", "w_triplet", "w_pair", "w_preserve", "w_imagenet", "imagenet_images",
                 "semantic_smoothing", "temperature", "class_text", "ema", "select", "encoder", "device", "workers"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    cfg.heldout_outside_gallery = not args.heldout_anywhere
    cfg.choose_settings = not args.train_only
    if args.interpolate:
        try:
            cfg.interpolate = tuple(float(a) for a in args.interpolate.split(","))
        except ValueError:
            cfg.interpolate = ()
        if not cfg.interpolate or not all(0.0 < a <= 1.0 for a in cfg.interpolate):
            raise common.CLIError(f"--interpolate takes weights in (0, 1] like 1,0.8,0.6, not {args.interpolate!r}")
    if not 0.0 < cfg.temperature <= 1.0:  # checked before data preparation, which takes minutes
        raise common.CLIError(f"--temperature takes a value in (0, 1] like 0.07, not {args.temperature}")
    if not 0.0 <= cfg.ema < 1.0:
        raise common.CLIError(f"--ema takes a decay in [0, 1) like 0.998 (0: off), not {args.ema}")
    res = finetune(cfg, Path(args.data), out, cache=Path(args.cache) if args.cache else None)
    print(json.dumps({"best": res["best"], "seconds": res["seconds"]}, indent=1))
    print(f"saved {args.out}")
    return 0


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="train backbone and heads end to end (encoder v2; resumable)")
    p.add_argument("--data", required=True, help="shared data folder (splits.json, caltech101, quickdraw)")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors; a shipped one only with --force)")
    p.add_argument("--force", action="store_true",
                   help="let --out replace a shipped checkpoint (then split it for a Space: scripts/shard_checkpoint.py)")
    p.add_argument("--cache", default=str(cache_dir() / "finetune"),
                   help="folder for decoded training photos (default $SBIR_HOME/cache/finetune; '' = none)")
    p.add_argument("--steps", type=int)
    p.add_argument("--encoder", choices=common.LITE_BACKBONES,
                   help="backbone to fine-tune (default efficientnet-lite0)")
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--init", metavar="CHECKPOINT", help="continue from a trained checkpoint (backbone and heads)")
    p.add_argument("--warmup", type=int, help="learning-rate warm-up steps")
    p.add_argument("--lr-backbone", dest="lr_backbone", type=float)
    p.add_argument("--lr-head", dest="lr_head", type=float)
    p.add_argument("--freeze-blocks", dest="freeze_blocks", type=int)
    p.add_argument("--sketches-per-step", dest="sketches_per_step", type=int)
    p.add_argument("--photos-per-step", dest="photos_per_step", type=int)
    p.add_argument("--doodle-photos-per-step", dest="doodle_photos_per_step", type=int,
                   help="doodles coloured like clip-art, on the photo side, per step")
    p.add_argument("--max-photos-per-class", dest="max_photos_per_class", type=int)
    p.add_argument("--val-every", dest="val_every", type=int)
    p.add_argument("--interpolate", metavar="A,B,...",
                   help="WiSE-FT: backbone weights a*trained + (1-a)*ImageNet, a chosen from these on held-out "
                        "classes (default 1: off); with --init and --steps 0, applied to a trained checkpoint")
    p.add_argument("--w-text", dest="w_text", type=float,
                   help="weight of aligning sketches and photos to their class-name text (MA-SBIR; default 1)")
    p.add_argument("--w-triplet", dest="w_triplet", type=float,
                   help="weight of the cross-modal sketch-photo triplet loss (ZSCMR; default 0.5)")
    p.add_argument("--w-pair", dest="w_pair", type=float,
                   help="weight of matching each photo with its own edge map among the batch (default 0.5)")
    p.add_argument("--w-preserve", dest="w_preserve", type=float,
                   help="weight of keeping the ImageNet backbone's photo-to-photo relations (default 0: off)")
    p.add_argument("--w-imagenet", dest="w_imagenet", type=float,
                   help="weight of keeping the ImageNet model's class predictions on every training image "
                        "(SAKE; default 0: off)")
    p.add_argument("--imagenet-images", dest="imagenet_images", choices=common.IMAGENET_IMAGES,
                   help="which training images --w-imagenet applies to (default all: sketches too)")
    p.add_argument("--semantic-smoothing", dest="semantic_smoothing", type=float,
                   help="share of the text-alignment target given to the other training classes by how close "
                        "their names are (default 0: one-hot)")
    p.add_argument("--temperature", type=float,
                   help="softmax temperature of the text alignment and the photo <-> edge map term (default 0.07)")
    p.add_argument("--class-text", dest="class_text", choices=common.CLASS_TEXTS,
                   help="what each class's text is: its name in prompts, or also its WordNet definition "
                        "(sbir_core/models/class_glosses.json; default names)")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights, e.g. 0.998 "
                        "(default 0: off)")
    p.add_argument("--select", choices=common.FINETUNE_SELECT,
                   help="what picks the step: held-out classes only, or also held-out doodles of training "
                        "classes (default; the shipped model's runs used zero-shot)")
    p.add_argument("--heldout-anywhere", action="store_true",
                   help="draw the held-out selection classes from every training class, default-gallery classes "
                        "included (how the v2 checkpoint was trained); default: from classes outside that gallery; "
                        "with --init, the start's held-out classes (less the gallery's unless this is given)")
    p.add_argument("--train-only", action="store_true",
                   help="train and select the step, save the model searched plainly; choose how it searches later "
                        "with --init OUT --steps 0 (for a machine without faiss, e.g. a lent GPU)")
    p.add_argument("--device", help="torch device to train on (default: cuda when there is one, else cpu)")
    p.add_argument("--workers", type=int,
                   help="processes that make the batches (default 0; on a GPU machine, its CPU cores)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_finetune)


def _cmd_train_relation(args: argparse.Namespace) -> int:
    common.require_splits(args.data)
    from sbir_core.training.relation import train_relation

    _, meta = train_relation(args.data, out=args.out, epochs=args.epochs, seed=args.seed,
                             encoder_name=args.encoder, allow_extract=not args.no_extract,
                             max_photos_per_class=args.max_photos_per_class or None,
                             checkpoint=args.checkpoint)
    print(json.dumps({k: meta[k] for k in ("val_mAP_all", "val_mAP_all_base", "best_epoch", "val_classes",
                                           "train_seconds")}, indent=1))
    print(f"wrote {args.out} (alpha {meta['alpha']:g})")
    return 0


def _cmd_eval_relation(args: argparse.Namespace) -> int:
    common.require_splits(args.data)
    from sbir_core.training.relation import benchmark_rerank

    res = benchmark_rerank(args.data, args.split, args.checkpoint, args.embedding, k=args.k, progress=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    return 0


def _add_relation(sub: Any) -> None:
    p = sub.add_parser("train-relation", help="train the cross-attention relation model (re-ranking, explanations)")
    p.add_argument("--data", required=True, help="the shared data folder (splits.json, caltech101/, quickdraw/)")
    p.add_argument("--out", default=str(checkpoint_path("relation")), help="where to write the model (.safetensors)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default=None, help="backbone name (default efficientnet-lite0)")
    p.add_argument("--checkpoint", default="none",
                   help="the encoder whose tokens and embedding it works with: 'none' (raw backbone, 14x14 "
                        "tokens), 'default' (the shipped model, 10x10) or a checkpoint path")
    p.add_argument("--max-photos-per-class", type=int, default=80,
                   help="Caltech photos per class (as in the feature cache; 0 = all)")
    p.add_argument("--no-extract", action="store_true", help="fail instead of extracting features missing from the cache")
    p.set_defaults(func=_cmd_train_relation)

    e = sub.add_parser("eval-relation", help="benchmark mAP with and without relation re-ranking")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="pacs")
    e.add_argument("--checkpoint", default=None, help="relation model (default checkpoints/relation.safetensors)")
    e.add_argument("--embedding", default="encoder",
                   help="what is re-ranked: 'encoder' (the relation model's encoder, as search ranks), "
                        "'raw' (its backbone's pooled cosine) or a heads-only checkpoint path")
    e.add_argument("-k", type=int, default=common.RELATION_TOPK, help="candidates re-ranked per query")
    e.add_argument("--json", default=None, help="also write the result here")
    e.set_defaults(func=_cmd_eval_relation)


def add(sub: Any) -> None:
    for add_one in (_add_train, _add_finetune, _add_relation):
        add_one(sub)
