"""What the library and the app need from a gallery, so another store can stand in for it.

`gallery.index.Gallery` (faiss, one process, files on one disk) is the one implementation.
A vector database (Milvus, Qdrant: see docs/SCALING.md) would implement the same methods:
`knn` as a filtered ANN query plus the exact re-ranking of `gallery.index`, `load` as
connecting to a collection, `save` as a snapshot; the app only ever calls these.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class GalleryBackend(Protocol):
    meta: dict[str, Any]  # format version, encoder id, modality, index type and settings
    root: Optional[Path]  # where it was opened from, None in memory
    paths: Sequence[str]  # image path per row (the app serves thumbnails of these only)
    labels: Sequence[str]  # class per row ("" when unknown)
    raw_embeddings: np.ndarray  # (N, D) unit vectors as encoded; rows are read, never all at once at scale
    tokens: Optional[np.ndarray]  # (N, T, C) token grids for explanations, or None
    grid: Optional[tuple[int, int]]

    @property
    def encoder_id(self) -> str: ...

    @property
    def modality(self) -> str: ...

    @property
    def source_dir(self) -> str: ...

    @property
    def index_type(self) -> str: ...

    def __len__(self) -> int: ...

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, rows), (Q, k), ranked as the model prescribes."""
        ...

    def search(self, queries: np.ndarray, k: int = 10) -> Any: ...

    def rank_of(self, query: np.ndarray, row: int) -> Optional[int]: ...  # None: past the ranked shortlist

    def save(self, directory: Any) -> Path: ...

    @classmethod
    def load(cls, directory: Any) -> "GalleryBackend": ...
