"""What the score sweeps share (bench_centering, bench_posterior, bench_seen_penalty): one
command line (--data, --checkpoint), the encoder it names, and one Markdown table row.
Imported as a sibling module: running a file in experiments/ puts that folder on the path."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sbir_core.data.datasets import DATA_HELP, data_root
from sbir_core.models.encoders import create_encoder

KEYS = ("hit@1", "hit@5", "P@5", "mAP@all")


def setup(doc: str) -> tuple[Path, Any]:
    """Parse the sweep's command line -> (data root, encoder)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default")
    args = ap.parse_args()
    return data_root(args.data), create_encoder(checkpoint=args.checkpoint)


def row(cells: tuple, report: dict) -> str:
    """| cell | ... | hit@1 | hit@5 | P@5 | mAP@all |"""
    return "| " + " | ".join(str(c) for c in cells) + " | " + " | ".join(f"{report[k]:.3f}" for k in KEYS) + " |"
