"""The gallery folder on disk: file names, reading and checking it, writing its item list.

Both `gallery.index` (which searches a gallery) and `gallery.build` (which writes one and
reads the previous one to reuse its vectors) use this module, so neither imports the other's
internals. A gallery is a folder holding
- `gallery.json`: format version, encoder id (backbone@checkpoint), modality, index type and
  parameters, source folder and, for galleries of up to `INLINE_ITEMS` pictures, one record
  per item (path relative to the source folder, label, size, mtime_ns) in row order;
- `items.arrow`: the same records as columns (Arrow IPC, memory-mapped) for bigger
  galleries, so that opening a million-picture gallery parses no million-entry JSON list;
- `embeddings.npy`: (N, D) float32, L2-normalised (cosine = inner product), memory-mapped
  when the gallery has an approximate index;
- `tokens.npy`: (N, T, C) float16 token grids for the explanations (optional);
- `index.faiss`: the approximate index (`gallery.ann`), for every type but `flat`, and
  `seen.npy`, each picture's seen-class confidence at the temperature the index was made with;
- `diffused-k<K>.npy`: the diffused embeddings of approximate galleries (`gallery.index`);
- `seen_prototypes.npy`: the encoder's training-class prototypes, when its checkpoint
  prescribes seen-class calibration (`gallery.calibration`).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from sbir_core.errors import SBIRError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GALLERY_FILE = "gallery.json"
ITEMS_FILE = "items.arrow"
EMBEDDINGS_FILE = "embeddings.npy"
TOKENS_FILE = "tokens.npy"
INDEX_FILE = "index.faiss"
SEEN_FILE = "seen.npy"  # each picture's seen-class confidence at the index's temperature
GALLERY_MODALITIES = ("photo", "sketch")
# Up to this many items stay readable in gallery.json; more go to ITEMS_FILE.
INLINE_ITEMS = 20_000
# Opening checks every embedding row up to this many rows, and an even sample of this
# many rows beyond (the build checked them all when it wrote the file).
CHECKED_ROWS = 20_000
ITEM_COLUMNS = ("path", "label", "size", "mtime_ns")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # tokens are stored as float16


class GalleryError(SBIRError):
    """A gallery folder is missing, incomplete or inconsistent."""


class StaleGalleryError(GalleryError):
    """The gallery was built with another encoder than the one used to query it."""


def diffused_file(k: int) -> str:
    return f"diffused-k{int(k)}.npy"


# ----------------------------------------------------------------------------- items
class Items(Sequence):
    """The gallery's item records in row order, from a JSON list or an Arrow table.

    Indexing gives one record (a dict); `column` gives a whole column as a list, which
    is what a million-item gallery should avoid asking for at open."""

    def __init__(self, records: Optional[list[dict]] = None, table: Any = None) -> None:
        self._records = records
        self._table = table
        self._columns: dict[str, list] = {}

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else self._table.num_rows

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._records is not None:
            return self._records[i]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        return {c: self._table.column(c)[i].as_py() for c in self._table.column_names}

    def __iter__(self) -> Iterator[dict]:
        if self._records is not None:
            return iter(self._records)
        return iter(self._table.to_pylist())

    def value(self, row: int, key: str, default: Any = "") -> Any:
        """One field of one record, without building the whole record."""
        if self._records is not None:
            return self._records[row].get(key, default)
        if key not in self._table.column_names:
            return default
        return self._table.column(key)[int(row)].as_py()

    def column(self, key: str, default: Any = "") -> list:
        if key not in self._columns:
            if self._records is not None:
                self._columns[key] = [it.get(key, default) for it in self._records]
            elif key in self._table.column_names:
                self._columns[key] = self._table.column(key).to_pylist()
            else:
                self._columns[key] = [default] * len(self)
        return self._columns[key]

    def distinct(self, key: str) -> list:
        """Sorted distinct values of a column (for 'how many classes'), without a Python list per row."""
        if self._records is not None:
            return sorted({it.get(key, "") for it in self._records})
        import pyarrow.compute as pc

        return sorted(pc.unique(self._table.column(key)).to_pylist())


def write_items(folder: Path, meta: dict, records: list[dict]) -> None:
    """Write gallery.json (with `records` inline, or beside it in ITEMS_FILE when many)."""
    meta = dict(meta)
    meta.pop("items", None)
    if len(records) <= INLINE_ITEMS:
        meta["items"] = records
    else:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        cols = {c: [r.get(c) for r in records] for c in ITEM_COLUMNS if any(c in r for r in records[:1])}
        cols["path"] = [r["path"] for r in records]
        cols.setdefault("label", [r.get("label", "") for r in records])
        table = pa.table(cols)
        with pa.OSFile(str(folder / ITEMS_FILE), "wb") as sink, ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        meta["items_file"] = ITEMS_FILE
    with open(folder / GALLERY_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # the rename that publishes the folder must not land before the data


def _read_items(root: Path, meta: dict) -> Items:
    if "items_file" not in meta:
        return Items(records=meta["items"])
    if meta["items_file"] != ITEMS_FILE:  # data must not name the files we open
        raise GalleryError(f"{root / GALLERY_FILE} names an unknown item file; rebuild the gallery")
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        table = ipc.open_file(pa.memory_map(str(root / ITEMS_FILE), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise GalleryError(f"cannot read {root / ITEMS_FILE}: {exc}; rebuild the gallery") from exc
    if "path" not in table.column_names or table.column("path").null_count:
        raise GalleryError(f"{root / ITEMS_FILE} lacks item paths; rebuild the gallery")
    return Items(table=table)


# ----------------------------------------------------------------------------- reading
class MetaFields:
    """The fields of gallery.json every reader asks for (a stored and a loaded gallery)."""

    meta: dict

    @property
    def encoder_id(self) -> str:
        return self.meta["encoder_id"]

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def index_type(self) -> str:
        return self.meta["index_type"]


@dataclass
class StoredGallery(MetaFields):
    """What a gallery folder holds, checked, arrays memory-mapped where asked."""

    root: Path
    meta: dict  # gallery.json without the item list
    items: Items
    embeddings: np.ndarray
    tokens: Optional[np.ndarray]

    @property
    def grid(self) -> Optional[tuple[int, int]]:
        g = self.meta.get("grid")
        return (int(g[0]), int(g[1])) if g else None


def confined(rel: str) -> bool:
    """A stored item path that stays inside its source folder (relative, no '..')."""
    p = rel.replace("\\", "/")
    parts = p.split("/")
    return bool(p) and not p.startswith("/") and ":" not in parts[0] and ".." not in parts


def load_array(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise GalleryError(f"{path} is missing: the gallery is incomplete; rebuild it")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GalleryError(f"cannot read {path}: {exc}; rebuild the gallery") from exc


def random_access(a: np.ndarray) -> np.ndarray:
    """Tell the kernel a memory-mapped array is read a few rows at a time: no read-ahead, so
    a search pages in the rows it reads, not the 128 KiB around each."""
    mm = getattr(a, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(__import__("mmap"), "MADV_RANDOM"):
        import mmap

        mm.madvise(mmap.MADV_RANDOM)
    return a


class RowReader:
    """Rows of a memory-mapped .npy file read with pread, the mapping left untouched: each page a
    mapping faults in stays in the process's RSS (with the kernel's fault-around, 64 KiB a
    row), so a search that reads 256 scattered rows through the map would, after a few hundred
    searches, hold the whole file. Reading into fresh buffers holds only those rows."""

    def __init__(self, mapped: np.memmap) -> None:
        self.shape, self.dtype = mapped.shape, mapped.dtype
        self._offset = int(mapped.offset)
        self._row = int(np.prod(mapped.shape[1:])) * mapped.dtype.itemsize
        self._fd = os.open(mapped.filename, os.O_RDONLY)

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.ravel()
        out = np.empty((len(flat), *self.shape[1:]), self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        size = self._row
        for j, i in enumerate(flat.tolist()):
            if os.preadv(self._fd, [view[j * size:(j + 1) * size]], self._offset + i * size) != size:
                raise GalleryError("the gallery's embeddings file is shorter than it says; rebuild the gallery")
        return out.reshape(*idx.shape, *self.shape[1:])

    def __del__(self) -> None:
        try:
            os.close(self._fd)
        except (OSError, AttributeError):
            pass


def rows_of(a: np.ndarray) -> Any:
    """A function idx -> a[idx] that reads a memory-mapped file by pread (`RowReader`)."""
    if isinstance(a, np.memmap) and a.filename and a.ndim == 2:
        return RowReader(a)
    return lambda idx: a[idx]


def read_gallery(root: Path, *, mmap_embeddings: bool = False, mmap_tokens: bool = True) -> StoredGallery:
    """Read and check a gallery folder; raises GalleryError when anything is missing or inconsistent."""
    recover(root)
    hint = f"build it with: python -m sbir_core index PHOTO_DIR --out {shlex.quote(str(root))}"
    if not root.is_dir():
        raise GalleryError(f"no gallery at {root}: {hint}")
    meta_path = root / GALLERY_FILE
    if not meta_path.is_file():
        raise GalleryError(f"{root} is not a gallery (no {GALLERY_FILE}): {hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GalleryError(f"cannot read {meta_path}: {exc}; rebuild the gallery") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise GalleryError(f"{meta_path} has format version {version!r}, this version of sbir_core reads "
                           f"{FORMAT_VERSION}; rebuild the gallery")
    missing = [k for k in ("encoder_id", "modality", "index_type", "dims", "has_tokens") if k not in meta]
    if "items" not in meta and "items_file" not in meta:
        missing.append("items")
    if missing:
        raise GalleryError(f"{meta_path} lacks {', '.join(missing)}; rebuild the gallery")
    try:
        items = _read_items(root, meta)
        n = len(items)
        d = meta["dims"]["embedding"]
        escaping = _escaping_paths(items, meta_path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise GalleryError(f"{meta_path} is malformed ({exc!r}); rebuild the gallery") from exc
    # Item paths are relative to the source folder and must stay inside it: a gallery
    # file is data, and data must not make us open /etc/... or ../../secrets.
    if escaping:
        raise GalleryError(f"{meta_path}: item path {escaping[0]!r} leaves the gallery's source folder; "
                           "rebuild the gallery")
    meta.pop("items", None)
    emb = load_array(root / EMBEDDINGS_FILE, mmap=mmap_embeddings)
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] != d:
        raise GalleryError(f"{root / EMBEDDINGS_FILE} is {emb.dtype} {emb.shape}, {GALLERY_FILE} lists {n} items "
                           f"of dimension {d}: the gallery is inconsistent; rebuild it")
    check_unit_rows(emb, root / EMBEDDINGS_FILE)
    tokens = None
    if meta["has_tokens"]:
        tokens = load_array(root / TOKENS_FILE, mmap=mmap_tokens)
        g = meta.get("grid") or (0, 0)
        want = (n, int(g[0]) * int(g[1]), meta["dims"].get("token"))
        if tokens.dtype != np.float16 or tokens.shape != want:
            raise GalleryError(f"{root / TOKENS_FILE} is {tokens.dtype} {tokens.shape}, expected float16 {want}: "
                               "the gallery is inconsistent; rebuild it")
    return StoredGallery(root, meta, items, random_access(emb) if mmap_embeddings else emb, tokens)


# Arrow's form of `confined`: empty, absolute, a drive or scheme in the first part, or a '..' part.
_ESCAPING = r"^$|^[/\\]|^[^/\\]*:|(^|[/\\])\.\.([/\\]|$)"


def _escaping_paths(items: Items, meta_path: Path) -> list[str]:
    """Item paths that leave the source folder (GalleryError for a missing path)."""
    if items._table is None:
        bad = [i for i, it in enumerate(items) if not isinstance(it.get("path"), str)]
        if bad:
            raise GalleryError(f"{meta_path}: item {bad[0]} has no path; rebuild the gallery")
        return [it["path"] for it in items if not confined(it["path"])]
    import pyarrow.compute as pc

    col = items._table.column("path")  # checked in Arrow: no Python string per row at open
    hits = pc.filter(col, pc.match_substring_regex(col, _ESCAPING))
    return hits.to_pylist()[:1]


def check_unit_rows(emb: np.ndarray, where: Any, limit: int = CHECKED_ROWS) -> None:
    """Every row finite and of unit norm: all rows up to `limit`, an even sample of `limit` beyond
    (a big memory-mapped file is checked in full when built, not read whole at every open)."""
    n = len(emb)
    rows = np.asarray(emb) if n <= limit else rows_of(emb)(np.linspace(0, n - 1, limit).astype(np.int64))
    if not np.isfinite(rows).all():
        raise GalleryError(f"{where} contains NaN or infinite values: it is corrupt; rebuild it")
    off = np.abs(np.linalg.norm(rows, axis=1) - 1.0) >= 1e-2
    if n and off.any():
        raise GalleryError(f"{where} has {int(off.sum())} {'sampled ' if n > limit else ''}rows that are not unit "
                           "vectors (zeros or garbage): it is corrupt; rebuild it")


# ----------------------------------------------------------------------------- interrupted builds
def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def recover(out: Path) -> None:
    """Finish what a build killed mid-swap left: restore the backup, drop dead temp folders."""
    parent = out.parent
    if not parent.is_dir():
        return
    if not out.exists():
        backups = sorted(parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if backups:
            log.warning("restoring gallery %s from %s (a previous build was interrupted)", out, backups[-1])
            os.replace(backups[-1], out)
    for tmp in parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("removing %s, left by an interrupted build", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
