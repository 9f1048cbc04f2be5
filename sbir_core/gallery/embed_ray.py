"""The Ray engine of `index` (`--engine ray`): embedding spread over Ray Data actors.

The pictures still to encode are cut into shards, fixed slices of their sorted list. Each
Ray Data actor loads the encoder once (from its checkpoint path, not a pickled model),
embeds whole shards with the default engine's own loop (`gallery.encode.encode_batches`: the
same decoding, the same pixels) and writes each as Parquet: path, label, embedding
(fixed-size list<float32>) and, unless --no-tokens, the token grid (float16 bytes). A shard
is written under a temporary name and renamed when complete; its name holds a digest of
its pictures (path, size, mtime) and of the encoder, so a rerun skips the shards already
done and never reuses a stale one. The gallery is then written from the shards by the
normal writer (`build.write_gallery` with this engine as its `embed`).

The same code runs on a local Ray (started here) and on a cluster (`--address`); on a
cluster the shards folder must be one every node can write to (a shared file system).
Ray is optional (`pip install .[scale]`): nothing here imports it until a build starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sbir_core.errors import InputError
from sbir_core.gallery.build import BuildReport, _Candidate
from sbir_core.gallery.encode import encode_batches, float16_tokens
from sbir_core.gallery.index import build_gallery
from sbir_core.gallery.identity import _encoder_name, _normalize_checkpoint_arg, checkpoint_spec
from sbir_core.paths import PathLike

INSTALL_HINT = ("The Ray engine needs Ray: pip install 'sbir-core[scale]' "
                "(or pip install \"ray[data]>=2.10\" pyarrow).")
SHARD_SIZE = 256  # pictures per shard: what a rerun redoes at most after an interruption
_META_KEY = b"sbir"


def require_ray() -> Any:
    """The `ray` module, or InputError saying how to install it."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return ray


def plan_shards(todo: list[_Candidate], key: str, shard_size: int = SHARD_SIZE) -> list[tuple[str, list[_Candidate]]]:
    """(file name, pictures) per shard: slice i of `todo` (sorted), named by its content and `key`."""
    plan = []
    for i, start in enumerate(range(0, len(todo), shard_size)):
        part = todo[start:start + shard_size]
        what = json.dumps([key, [(str(c.path), c.label, c.size, c.mtime_ns) for c in part]])
        plan.append((f"shard-{i:05d}-{hashlib.sha256(what.encode()).hexdigest()[:16]}.parquet", part))
    return plan


def write_shard(path: Path, encoder: Any, modality: str, items: list[_Candidate], store_tokens: bool,
                batch_size: int) -> int:
    """Embed `items` and write them to the Parquet file `path` (atomically) -> rows written.
    Unreadable pictures are left out and listed in the file's metadata, to be reported."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    skipped: list[tuple[str, str]] = []
    paths, labels, embs, tokens = [], [], [], []
    grid = token_shape = None
    for batch, output in encode_batches(encoder, modality, items, batch_size, skipped):
        paths += [str(c.path) for c in batch]
        labels += [c.label for c in batch]
        embs.append(output.normalized())
        grid = [int(v) for v in output.grid]
        if store_tokens:
            t = float16_tokens(output)
            token_shape = [int(t.shape[1]), int(t.shape[2])]
            tokens += [row.tobytes() for row in t]
    emb = np.concatenate(embs) if embs else np.zeros((0, 1), np.float32)
    cols = {"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])}
    if store_tokens:
        cols["tokens"] = pa.array(tokens, pa.binary())
    meta = {"skipped": skipped, "grid": grid, "token_shape": token_shape}
    table = pa.table(cols).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a shard exists only when complete
    return len(paths)


class _ShardActor:
    """A Ray Data actor: loads the encoder once, then embeds whole shards (one row = one shard)."""

    def __init__(self, encoder_name: str, checkpoint: str, encoder_id: str, device: str, threads: int,
                 fused: bool, modality: str, store_tokens: bool, batch_size: int, folder: str) -> None:
        import torch

        from sbir_core.models.encoders import create_encoder

        torch.set_num_threads(threads)
        self.encoder = create_encoder(encoder_name, checkpoint=checkpoint, device=device)
        if str(self.encoder.encoder_id) != encoder_id:  # e.g. a checkpoint file that changed meanwhile
            raise RuntimeError(f"a Ray worker loaded {self.encoder.encoder_id}, not {encoder_id}")
        if fused:  # as the driver's encoder: both engines then give the same embeddings
            self.encoder.backbone.fuse_for_inference()
        self.args = (modality, store_tokens, batch_size)
        self.folder = Path(folder)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        modality, store_tokens, batch_size = self.args
        done = []
        for name, items in zip(batch["name"], batch["items"]):
            cands = [_Candidate(rel, Path(p), label, int(size), int(mtime))
                     for rel, p, label, size, mtime in json.loads(items)]
            done.append(write_shard(self.folder / str(name), self.encoder, modality, cands, store_tokens, batch_size))
        return {"name": list(batch["name"]), "rows": done}


@dataclass
class RayEngine:
    """An `embed` engine for `build_gallery`: embeds on Ray, returns what `encode.encode_all` returns."""

    encoder_name: str
    checkpoint: str  # what each actor loads: "default", "none" or a checkpoint path
    shards: Path
    workers: Optional[int] = None  # None: one per CPU (one thread each), or per GPU share
    gpus_per_worker: float = 0.0
    address: Optional[str] = None
    shard_size: int = SHARD_SIZE
    embedded: int = 0  # shards embedded by this build
    reused: int = 0  # shards found complete from an earlier run

    def __call__(self, encoder: Any, modality: str, todo: list[_Candidate], tmp: Path, store_tokens: bool,
                 batch_size: int, progress: bool, skipped: list[tuple[str, str]]) -> tuple:
        if not todo:
            return {}, None, None, None
        key = f"{encoder.encoder_id}|{modality}|tokens={bool(store_tokens)}"
        plan = plan_shards(todo, key, self.shard_size)
        self.shards.mkdir(parents=True, exist_ok=True)
        missing = [(name, items) for name, items in plan if not (self.shards / name).is_file()]
        self.reused, self.embedded = len(plan) - len(missing), len(missing)
        if missing:
            self._run(missing, encoder, modality, store_tokens, batch_size, progress)
        return _read_shards(self.shards, plan, tmp, store_tokens, skipped)

    def _run(self, missing: list[tuple[str, list[_Candidate]]], encoder: Any, modality: str, store_tokens: bool,
             batch_size: int, progress: bool) -> None:
        ray = require_ray()
        started = not ray.is_initialized()
        if started:  # a local Ray, or the cluster at --address; same code either way
            try:
                # "local": a fresh Ray here, never a cluster found by chance (--address auto joins one)
                ray.init(address=self.address or "local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as exc:
                where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray"
                raise InputError(f"cannot {where}: {str(exc).splitlines()[0][:300]}") from exc
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines are noise in `index`
        try:
            from ray.data import ActorPoolStrategy, DataContext

            DataContext.get_current().enable_progress_bars = progress
            alive = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [1]
            gpus = ray.cluster_resources().get("GPU", 0)
            if self.gpus_per_worker and gpus < self.gpus_per_worker:
                raise InputError(f"--gpus-per-worker {self.gpus_per_worker:g}: the Ray cluster has {gpus:g} GPUs.")
            # Default: one actor per CPU, one torch thread each (on a busy 2-core machine two
            # 1-thread processes encoded 4x faster than one 2-thread process), or one per GPU
            # share. An actor with a GPU needs one CPU to decode; otherwise actors split the
            # CPUs, at most one node's worth each.
            if self.gpus_per_worker:
                self.workers = self.workers or max(1, int(gpus / self.gpus_per_worker))
                cpus = 1
            else:
                self.workers = self.workers or max(1, int(sum(alive)))
                cpus = max(1, min(int(sum(alive)) // self.workers, int(min(alive))))
            rows = [{"name": name, "items": json.dumps([(c.rel, str(c.path), c.label, c.size, c.mtime_ns)
                                                        for c in items])} for name, items in missing]
            self.workers = min(self.workers, len(rows))  # an actor per shard at most: what the report says
            # One block per shard, so that every actor gets some (Ray would pack small rows together).
            ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                _ShardActor, batch_size=1, compute=ActorPoolStrategy(size=self.workers),
                num_cpus=cpus, num_gpus=self.gpus_per_worker or None,
                fn_constructor_kwargs=dict(
                    encoder_name=_encoder_name(encoder), checkpoint=self.checkpoint,
                    encoder_id=str(encoder.encoder_id), device="cuda" if self.gpus_per_worker else "cpu",
                    threads=cpus, fused=encoder.backbone.fused, modality=modality, store_tokens=store_tokens,
                    batch_size=batch_size, folder=str(self.shards)))
            done = ds.take_all()
        finally:
            if started:
                ray.shutdown()
        lost = [r["name"] for r in done if not (self.shards / r["name"]).is_file()]
        if lost:
            raise InputError(f"{len(lost)} shards were written where this machine cannot read them; on a cluster, "
                             "pass --shards a folder every node shares.")


def _read_shards(folder: Path, plan: list[tuple[str, list[_Candidate]]], tmp: Path, store_tokens: bool,
                 skipped: list[tuple[str, str]]) -> tuple:
    """The shards, in plan order -> (rel -> row, embeddings, grid, (T, C)), tokens into
    `tmp`/tokens.partial: what `encode.encode_all` returns."""
    import pyarrow.parquet as pq

    rows: dict[str, int] = {}
    embs: list[np.ndarray] = []
    grid = token_shape = None
    with open(tmp / "tokens.partial", "wb") if store_tokens else open(os.devnull, "wb") as scratch:
        for name, items in plan:
            table = pq.read_table(folder / name)
            meta = json.loads(table.schema.metadata[_META_KEY])
            skipped += [tuple(s) for s in meta["skipped"]]
            if not table.num_rows:
                continue
            grid = tuple(meta["grid"])
            by_path = {str(c.path): c.rel for c in items}
            for p in table.column("path").to_pylist():
                rows[by_path[p]] = len(rows)
            col = table.column("embedding").combine_chunks()
            embs.append(col.flatten().to_numpy().astype(np.float32).reshape(len(col), -1))
            if store_tokens:
                token_shape = tuple(meta["token_shape"])
                for b in table.column("tokens").to_pylist():
                    scratch.write(b)
    return rows, (np.concatenate(embs) if embs else None), grid, token_shape


def build_gallery_ray(source: PathLike, out: PathLike, encoder: Any, *, checkpoint: Optional[PathLike] = None,
                      shards: Optional[PathLike] = None, workers: Optional[int] = None,
                      gpus_per_worker: float = 0.0,
                      address: Optional[str] = None, shard_size: int = SHARD_SIZE,
                      **kwargs: Any) -> tuple[Any, BuildReport, RayEngine]:
    """`index.build_gallery` with the encoding done on Ray -> (gallery, report, engine: shard counts).

    `shards`: where the Parquet shards go (default: OUT.shards beside the gallery, removed
    once the gallery is written; a folder you name is kept)."""
    require_ray()
    if workers is not None and workers < 1:
        raise InputError("--workers must be at least 1")
    if gpus_per_worker < 0:
        raise InputError("--gpus-per-worker cannot be negative")
    out_path = Path(out).resolve()
    folder = Path(shards).resolve() if shards else out_path.with_name(out_path.name + ".shards")
    spec = _normalize_checkpoint_arg(checkpoint) or checkpoint_spec(encoder)
    engine = RayEngine(_encoder_name(encoder), spec, folder, workers, float(gpus_per_worker), address, shard_size)
    gallery, report = build_gallery(source, out, encoder, checkpoint=checkpoint, embed=engine, **kwargs)
    if shards is None:
        shutil.rmtree(folder, ignore_errors=True)
    return gallery, report, engine
