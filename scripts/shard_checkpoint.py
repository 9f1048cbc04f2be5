#!/usr/bin/env python3
"""Store a checkpoint as shards under 10 MB (a Hugging Face Space refuses larger files in
plain git), then check that every tensor reads back bit for bit and the id is kept.

    python -m sbir_core finetune ... --out run.safetensors
    python scripts/shard_checkpoint.py run.safetensors checkpoints/default.safetensors

writes checkpoints/default-0000k-of-0000N.safetensors and default.safetensors.index.json
(Hugging Face's layout), and removes checkpoints/default.safetensors and older shards.
Every reader in sbir_core takes either name (`models.checkpoint`).
"""
from __future__ import annotations

import argparse

import torch

from sbir_core.models.checkpoint import MAX_SHARD_BYTES, checkpoint_digest, read_stored, split_checkpoint


def _bytes(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a checkpoint (.safetensors, or a shard index)")
    ap.add_argument("dest", nargs="?", help="the name to store it under (default: src)")
    ap.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES)
    args = ap.parse_args(argv)
    before, header = read_stored(args.src)  # read first: src may be replaced
    digest = checkpoint_digest(args.src)
    index = split_checkpoint(args.src, args.dest, args.max_shard_bytes)
    after, header_after = read_stored(index)
    same = (before.keys() == after.keys() and header == header_after
            and all(before[k].dtype == after[k].dtype and before[k].shape == after[k].shape
                    and _bytes(before[k]) == _bytes(after[k]) for k in before))
    shards = sorted(index.parent.glob(index.name.removesuffix(".safetensors.index.json") + "-*-of-*.safetensors"))
    for s in shards:
        print(f"{s}  {s.stat().st_size / 1e6:.2f} MB")
    print(f"{index}: {len(after)} tensors, bit-identical: {same}; id {checkpoint_digest(index)} (was {digest})")
    return 0 if same and checkpoint_digest(index) == digest else 1


if __name__ == "__main__":
    raise SystemExit(main())
