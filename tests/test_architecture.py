"""The layout by concern holds: each layer imports only the layers below it, the
library never imports the app, and modules stay small unless they are one thing."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sbir_core"
# Lower number = lower layer. A module may import its own layer and those below.
LAYERS = {"errors": 0, "paths": 0, "data": 1, "models": 2, "gallery": 3, "explain": 4, "eval": 5,
          "training": 6, "service": 7, "cli": 8, "__main__": 8, "__init__": 8}
# Modules allowed over MAX_LINES because each is one cohesive thing: (why, the most lines it
# may grow to). A cap is the size when it was granted plus a little; past it, split the module.
COHESIVE = {
    "explain/correspondence.py": ("one algorithm: placing a drawing on a photo and choosing the lines", 700),
    "explain/embedding_map.py": ("the map: fit, place, save/load and render", 660),
    "service.py": ("orchestration of the app's calls and their result types", 660),
    "gallery/index.py": ("the gallery format: load, validate, search (faiss)", 690),
    "gallery/store.py": ("named and class galleries: discovery, re-indexing, uploads, thumbnails", 600),
    "gallery/build.py": ("the incremental, atomic gallery build", 490),
    "training/finetune.py": ("the encoder fine-tuning loop, its validation and calibration", 630),
    "models/encoders.py": ("the backbones and the SBIREncoder that wraps them", 560),
    "models/relation.py": ("the relation network, its checkpoint and re-ranking", 460),
    "eval/metrics.py": ("retrieval metrics", 480),
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
    size = {str(rel): len(path.read_text(encoding="utf-8").splitlines()) for path, rel in _modules()}
    over = {m: n for m, n in size.items() if n > MAX_LINES and m not in COHESIVE}
    assert not over, f"split these or justify them in COHESIVE: {over}"
    past_cap = {m: (size[m], cap) for m, (_why, cap) in COHESIVE.items() if size.get(m, 0) > cap}
    assert not past_cap, f"past their cap, split them: {past_cap}"
    stale = [m for m in COHESIVE if size.get(m, 0) <= MAX_LINES]
    assert not stale, f"no longer need an exemption (or are gone): {stale}"
    assert all(cap <= 700 for _why, cap in COHESIVE.values())  # even a cohesive module this big is several things


def _module_imports() -> dict[str, set[str]]:
    """sbir_core module -> the sbir_core modules it imports at module level (not inside functions)."""
    mods = {"sbir_core." + ".".join(rel.with_suffix("").parts).removesuffix(".__init__"): path
            for path, rel in _modules()}
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sbir_core"):
                # `from pkg import submodule` imports the submodule
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("sbir_core")}
        out[name] = deps - {name}
    return out


def test_no_import_cycles_at_module_level() -> None:
    graph = _module_imports()
    done: set[str] = set()

    def visit(mod: str, stack: list[str]) -> None:
        if mod in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(mod):] + [mod]))
        if mod in done or mod not in graph:
            return
        for dep in graph[mod]:
            visit(dep, stack + [mod])
        done.add(mod)

    for mod in graph:
        visit(mod, [])
