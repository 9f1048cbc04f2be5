"""`finetune` (the encoder end to end; its flags generated from `FinetuneConfig`) and the
relation model's `train-relation` / `eval-relation`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sbir_core.cli import common, settings_flags
from sbir_core.paths import cache_dir, checkpoint_path, is_shipped_checkpoint


def _out(arg: str, force: bool) -> Path:
    """--out, refused when it would replace a shipped checkpoint (unless --force): a run
    that writes there by mistake would silently change what every user gets."""
    if is_shipped_checkpoint(arg) and not force:
        raise common.CLIError(f"--out {arg} would overwrite a shipped checkpoint; write somewhere else, "
                              "or add --force to replace it on purpose")
    return Path(arg)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from sbir_core.training.config import FinetuneConfig
    from sbir_core.training.finetune import finetune

    out = _out(args.out, args.force)  # before data preparation, which takes minutes
    cfg = settings_flags.settings_from(FinetuneConfig, args, args.recipe)
    res = finetune(cfg, common.data_folder(args.data), out, cache=Path(args.cache) if args.cache else None)
    print(json.dumps({"best": res["best"], "seconds": res["seconds"]}, indent=1))
    print(f"saved {args.out}")
    return 0


def _add_finetune(sub: Any) -> None:
    from sbir_core.training.config import CHOICES, FinetuneConfig  # a plain dataclass: imports nothing heavy

    p = sub.add_parser("finetune", help="train backbone and heads end to end (encoder v2; resumable)",
                       formatter_class=settings_flags.HelpFormatter,
                       description="Fine-tune the encoder. Settings come from their defaults, then --recipe, "
                                   "then the flags given.")
    p.add_argument("--data", help=common.DATA_HELP)
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors; a shipped one only with --force)")
    p.add_argument("--force", action="store_true",
                   help="let --out replace a shipped checkpoint (then split it for a Space: scripts/shard_checkpoint.py)")
    p.add_argument("--cache", default=str(cache_dir() / "finetune"),
                   help="folder for decoded training photos ('' = none)")
    p.add_argument("--recipe", metavar="FILE.json",
                   help="a JSON object of the settings below (names as in FinetuneConfig, e.g. "
                        '{"steps": 900, "w_triplet": 0}); flags given override it')
    settings_flags.add_flags(p.add_argument_group("settings (sbir_core.training.config.FinetuneConfig)"),
                             FinetuneConfig, choices={**CHOICES, "encoder": common.LITE_BACKBONES,
                                                      "class_text": common.CLASS_TEXTS})
    p.set_defaults(func=_cmd_finetune)


def _cmd_train_relation(args: argparse.Namespace) -> int:
    args.data = common.data_folder(args.data)
    from sbir_core.training.relation_training import train_relation

    _, meta = train_relation(args.data, out=args.out, epochs=args.epochs, seed=args.seed,
                             encoder_name=args.encoder, allow_extract=not args.no_extract,
                             max_photos_per_class=args.max_photos_per_class or None,
                             checkpoint=args.checkpoint)
    print(json.dumps({k: meta[k] for k in ("val_mAP_all", "val_mAP_all_base", "best_epoch", "val_classes",
                                           "train_seconds")}, indent=1))
    print(f"wrote {args.out} (alpha {meta['alpha']:g})")
    return 0


def _cmd_eval_relation(args: argparse.Namespace) -> int:
    args.data = common.data_folder(args.data)
    from sbir_core.training.relation_training import benchmark_rerank

    res = benchmark_rerank(args.data, args.split, args.checkpoint, args.embedding, k=args.k, progress=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    return 0


def _add_relation(sub: Any) -> None:
    p = sub.add_parser("train-relation", help="train the cross-attention relation model (re-ranking, explanations)")
    p.add_argument("--data", help=common.DATA_HELP)
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
    e.add_argument("--data", help=common.DATA_HELP)
    e.add_argument("--split", default="pacs")
    e.add_argument("--checkpoint", default=None, help="relation model (default checkpoints/relation.safetensors)")
    e.add_argument("--embedding", default="encoder",
                   help="what is re-ranked: 'encoder' (the relation model's encoder, as search ranks), "
                        "'raw' (its backbone's pooled cosine) or a heads-only checkpoint path")
    e.add_argument("-k", type=int, default=common.RELATION_TOPK, help="candidates re-ranked per query")
    e.add_argument("--json", default=None, help="also write the result here")
    e.set_defaults(func=_cmd_eval_relation)


def add(sub: Any) -> None:
    for add_one in (_add_finetune, _add_relation):
        add_one(sub)
