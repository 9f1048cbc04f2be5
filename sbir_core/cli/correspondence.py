"""`train-correspondence`: the dense correspondence head the explanation lines use."""
from __future__ import annotations

import argparse
import json
from typing import Any

from sbir_core.cli import common
from sbir_core.cli.training import _out  # the one guard against overwriting a shipped checkpoint


def _cmd_train_correspondence(args: argparse.Namespace) -> int:
    out = _out(args.out, args.force)  # before the pool is encoded, which takes minutes
    args.data = common.data_folder(args.data)
    from pathlib import Path

    import torch

    from sbir_core.training.correspondence import train_head

    torch.set_num_threads(args.threads)
    encoder = common.load_encoder(None, args.checkpoint)
    res = train_head(Path(args.data), out, encoder, pairs=args.pairs, epochs=args.epochs,
                     batch=args.batch, seed=args.seed, state=Path(args.state) if args.state else None,
                     log=lambda m: print(m, flush=True))
    print(json.dumps({"best_selection_accuracy": res["best_selection_accuracy"], "out": res["out"]}))
    return 0


def add(sub: Any) -> None:
    p = sub.add_parser("train-correspondence",
                       help="train the dense correspondence head (explanation lines; frozen encoder, resumable)")
    p.add_argument("--data", help=common.DATA_HELP)
    p.add_argument("--out", required=True,
                   help="where to write the head (.safetensors; the shipped checkpoints/correspondence.safetensors "
                        "only with --force)")
    p.add_argument("--force", action="store_true", help="let --out replace a shipped checkpoint")
    p.add_argument("--checkpoint", default="default", help="the encoder whose features it reads")
    p.add_argument("--pairs", type=int, default=4000,
                   help="training pairs, encoded once (half photo/edge map, half doodle/colour fill)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--state", default=None, help="resume file (written every epoch; the encoded pairs go to STATE.pool)")
    p.set_defaults(func=_cmd_train_correspondence)
