"""`SearchResult`: one result of a search, the one result type from the gallery's k-NN to
the page (`Gallery.search` makes them; the service adds each picture's thumbnail)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SearchResult:
    rank: int  # 0-based place in the result list
    index: int  # row in the gallery
    path: str  # the gallery image (absolute path)
    score: float  # cosine similarity (inner product of normalised vectors), or the re-ranked score
    label: str
    thumb: Optional[str] = None  # a small copy for a results grid (the service fills it; None: use `path`)
    past_shortlist: bool = False  # a big gallery ranks only its first `rank` results, and this is not one

    @property
    def heading(self) -> str:
        """How an explanation names it: "Result 3", or where a big gallery stops counting."""
        return f"Not in the first {self.rank} results" if self.past_shortlist else f"Result {self.rank + 1}"

    @property
    def name(self) -> str:
        """The class in words (what the page calls the picture)."""
        return self.label.replace("_", " ") if self.label else "(no class)"

    @property
    def caption(self) -> str:
        # Its place in the list and its class: a caption never disagrees with the order
        # (calibration and diffusion can put a lower similarity first; the explanation's
        # details give the number).
        return f"{self.rank + 1}. {self.name}"
