"""The layout by concern holds: each layer imports only the layers below it, the
library never imports the app, and modules stay small unless they are one thing."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sbir_core"
# Lower number = lower layer. A module may import its own layer and those below.
LAYERS = {"errors": 0, "paths": 0, "data": 1, "models": 2, "gallery": 3, "explain": 4, "eval": 5,
          "training": 6, "service": 7, "cli": 8, "__main__": 8, "__init__": 8}
# Modules allowed over ~400 lines, because each is one cohesive thing.
COHESIVE = {
    "explain/correspondence.py": "one algorithm: placing a drawing on a photo and choosing the lines",
    "explain/embedding_map.py": "the t-SNE map: fit, place, save/load and render",
    "service.py": "orchestration of the app's calls and their result types",
    "gallery/index.py": "the gallery format: load, validate, search (faiss)",
    "gallery/store.py": "named galleries: discovery, re-indexing, uploads, thumbnails",
    "gallery/build.py": "the incremental, atomic gallery build",
    "training/finetune.py": "the encoder fine-tuning loop, its validation and calibration",
    "training/train.py": "the heads' training loop and its losses",
    "models/encoders.py": "the backbones and the SBIREncoder that wraps them",
    "models/relation.py": "the relation network, its checkpoint and re-ranking",
    "eval/metrics.py": "retrieval metrics",
}
MAX_LINES = 400


def _layer(rel: Path) -> int:
    return LAYERS[rel.parts[0] if len(rel.parts) > 1 else rel.stem]


def _modules():
    for p in sorted(PKG.rglob("*.py")):
        yield p, p.relative_to(PKG)


def test_layers_import_only_downwards() -> None:
    bad = []
    for path, rel in _modules():
        mine = _layer(rel)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sbir_core."):
                target = node.module.split(".")[1]
                if LAYERS.get(target, -1) > mine:
                    bad.append(f"{rel} imports {node.module}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.split(".")[0] in ("app", "sbir_app", "gradio") for n in names if n), f"{rel} imports the app layer"
    assert not bad, "\n".join(bad)


def test_modules_stay_small_unless_cohesive() -> None:
    big = {str(rel): len(path.read_text(encoding="utf-8").splitlines()) for path, rel in _modules()}
    over = {m: n for m, n in big.items() if n > MAX_LINES and m not in COHESIVE}
    assert not over, f"split these or justify them in COHESIVE: {over}"
    assert max(big.values()) < 700, big  # even a cohesive module this big is several things
