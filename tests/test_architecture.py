"""The layout by concern holds: each layer imports only the layers below it, the
library never imports the app, no module imports one that imports it back (not even inside
a function), modules stay small unless they are one thing, and docs/ARCHITECTURE.md names
the modules there are. Each rule is also run on made-up input, to show it can fail."""
from __future__ import annotations

import ast
import re
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
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sbir_core."):
                targets = [(node.module.split(".")[1], node.module)]
            elif isinstance(node, ast.ImportFrom) and node.module == "sbir_core":  # from sbir_core import gallery
                targets = [(a.name, f"sbir_core.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [(a.name.split(".")[1], a.name) for a in node.names if a.name.startswith("sbir_core.")]
            bad += [f"{rel} imports {full}" for target, full in targets if LAYERS.get(target, -1) > mine]
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.split(".")[0] in ("app", "sbir_app", "gradio") for n in names if n), f"{rel} imports the app layer"
    assert not bad, "\n".join(bad)


def size_problems(size: dict[str, int], cohesive: dict, max_lines: int = MAX_LINES, hard_cap: int = 700) -> list[str]:
    """What breaks the size rule, given each module's line count: a module over `max_lines`
    without an exemption, an exempt module past its cap, an exemption without a reason, a cap
    over `hard_cap`, an exemption no longer needed (or for a module that is gone)."""
    problems = [f"{m}: {n} lines, over {max_lines}: split it or justify it in COHESIVE"
                for m, n in sorted(size.items()) if n > max_lines and m not in cohesive]
    for m, (why, cap) in sorted(cohesive.items()):
        if not (isinstance(why, str) and why.strip()):
            problems.append(f"{m}: an exemption needs a reason")
        if not isinstance(cap, int) or cap > hard_cap:
            problems.append(f"{m}: cap {cap} is over {hard_cap}: even a cohesive module this big is several things")
        elif size.get(m, 0) > cap:
            problems.append(f"{m}: {size[m]} lines, past its cap of {cap}: split it")
        if size.get(m, 0) <= max_lines:
            problems.append(f"{m}: no longer needs an exemption (or is gone)")
    return problems


def test_modules_stay_small_unless_cohesive() -> None:
    size = {str(rel): len(path.read_text(encoding="utf-8").splitlines()) for path, rel in _modules()}
    problems = size_problems(size, COHESIVE)
    assert not problems, "\n".join(problems)


def test_the_size_rule_can_fail() -> None:
    """The rule itself, on made-up modules: each way of breaking it is caught, and nothing else."""
    ok = {"a.py": 120, "big.py": 650}
    why = {"big.py": ("one thing", 660)}
    assert size_problems(ok, why) == []
    assert "over 400" in " ".join(size_problems({**ok, "new.py": 401}, why))           # unexempted and big
    assert "past its cap" in " ".join(size_problems({**ok, "big.py": 661}, why))      # grew past its cap
    assert "needs a reason" in " ".join(size_problems(ok, {"big.py": ("", 660)}))     # no reason
    assert "over 700" in " ".join(size_problems({**ok, "big.py": 690}, {"big.py": ("one thing", 720)}))
    assert "no longer needs" in " ".join(size_problems({**ok, "big.py": 380}, why))   # shrank
    assert "no longer needs" in " ".join(size_problems(ok, {**why, "gone.py": ("was big", 500)}))


def _type_checking_only(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports there never run."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_anywhere(tree: ast.AST):
    """Every import statement in a module, inside functions and classes too, except those
    under `if TYPE_CHECKING:` (their `else:` branch does run, so it is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _module_names() -> dict[str, Path]:
    """Every module of the library and of the page package, by its dotted name."""
    out = {}
    for pkg in (PKG, PKG.parent / "sbir_app"):
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(pkg.parent)
            out[".".join(rel.with_suffix("").parts).removesuffix(".__init__")] = path
    return out


def _resolve(name: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ImportFrom names, relative imports (`from . import x`) included."""
    if not node.level:
        return node.module or ""
    pkg = name.rsplit(".", node.level - is_package)[0] if node.level - is_package else name
    return f"{pkg}.{node.module}" if node.module else pkg


OURS = ("sbir_core", "sbir_app")


def _module_imports(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Our module -> our modules it imports anywhere in its text (module level,
    inside functions and classes, not under `if TYPE_CHECKING:`). `sources` (name -> text)
    replaces the package's files, for tests of this function."""
    packages: set[str] = set()
    if sources is None:
        names = _module_names()
        sources = {name: path.read_text(encoding="utf-8") for name, path in names.items()}
        packages = {name for name, path in names.items() if path.name == "__init__.py"}
    out: dict[str, set[str]] = {}
    for name, text in sources.items():
        deps = set()
        for node in _imports_anywhere(ast.parse(text)):
            if isinstance(node, ast.ImportFrom):
                module = _resolve(name, node, name in packages)
                if not module.startswith(OURS):
                    continue
                # `from pkg import submodule` imports the submodule
                subs = {f"{module}.{a.name}" for a in node.names} & sources.keys()
                deps |= subs or {module}
            else:
                deps |= {a.name for a in node.names if a.name.startswith(OURS)}
        out[name] = deps - {name}
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import loop: the strongly connected groups of more than one module (Tarjan),
    each as a path that closes on its first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_loop_through(graph, g) for g in groups]


def _loop_through(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One readable loop inside a strongly connected group, from its first module back to it."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way round
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group


def test_no_import_loops() -> None:
    """No module imports, even inside a function, a module that imports it back: such a loop
    works only while the import stays inside the function, and ties two concerns into one."""
    loops = import_cycles(_module_imports())
    assert not loops, "import loops:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_the_loop_check_sees_imports_inside_functions() -> None:
    """The check itself, on made-up modules: a loop closed by an import inside a function (or
    a method, or a relative import) is found; one closed only under TYPE_CHECKING is not."""
    a = "from sbir_core.b import f\n"
    b_inside = "def f():\n    from sbir_core.a import g\n    return g\n"
    b_method = "class B:\n    def m(self):\n        import sbir_core.a\n"
    b_relative = "def f():\n    from .a import g\n"
    b_typing = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sbir_core.a import g\n"
                "else:\n    g = None\n")
    for b in (b_inside, b_method, b_relative):
        loops = import_cycles(_module_imports({"sbir_core.a": a, "sbir_core.b": b}))
        assert loops == [["sbir_core.a", "sbir_core.b", "sbir_core.a"]], (b, loops)
    assert import_cycles(_module_imports({"sbir_core.a": a, "sbir_core.b": b_typing})) == []
    three = {"sbir_core.x": "from sbir_core import y\n", "sbir_core.y": "def f():\n    import sbir_core.z\n",
             "sbir_core.z": "from sbir_core.x import q\n"}
    assert import_cycles(_module_imports(three)) == [["sbir_core.x", "sbir_core.y", "sbir_core.z", "sbir_core.x"]]


# ----------------------------------------------------------------------------- docs/ARCHITECTURE.md is true
ROOT = PKG.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
APP = ROOT / "sbir_app"


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the Markdown table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _listed_modules(cell: str) -> list[str]:
    """The modules a concern cell lists: each item (split at `,` and `;` outside brackets)
    that starts with a `name` in backticks. Names inside brackets are explanations."""
    items, depth, cur = [], 0, ""
    for ch in cell:
        depth += ch in "([" and 1 or (-1 if ch in ")]" else 0)
        if ch in ",;" and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [m.group(1) for item in items if (m := re.match(r"\s*`(\w+)`", item))]


def architecture_doc_problems(text: str, pkg: Path = PKG, app: Path = APP) -> list[str]:
    """What docs/ARCHITECTURE.md says that the code does not bear out: a module it names that
    does not exist, a subpackage or module it leaves out, a layer number other than the
    architecture test's, a file path that is not there."""
    problems = []
    subpackages = sorted(p.parent.name for p in pkg.glob("*/__init__.py"))
    top_modules = sorted(p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__"))
    named = set()
    for layer, where, concern in _table_rows(text, "| layer |"):
        name = where.strip("`").removesuffix(".py").rstrip("/")
        named.add(name)
        if not ((pkg / name).is_dir() or (pkg / f"{name}.py").is_file()):
            problems.append(f"layer table: `{where}` is not in sbir_core")
            continue
        if str(LAYERS.get(name)) != layer:
            problems.append(f"layer table: `{where}` is layer {layer} in the doc, {LAYERS.get(name)} in LAYERS")
        if (pkg / name).is_dir():
            listed = set(_listed_modules(concern))  # claimed to be modules
            mentioned = set(re.findall(r"`(\w+)`", concern))
            actual = {p.stem for p in (pkg / name).glob("*.py")}
            problems += [f"layer table, {name}/: `{m}` is not a module of sbir_core/{name}"
                         for m in sorted(listed - actual)]
            problems += [f"layer table, {name}/: module `{m}` is not listed"
                         for m in sorted(actual - mentioned - {"__init__"})]
    problems += [f"layer table: sbir_core/{s}/ is not named" for s in subpackages if s not in named]
    problems += [f"layer table: sbir_core/{m}.py is not named" for m in top_modules if m not in named]
    page = {row[0].strip("`") for row in _table_rows(text, "| module |")}
    for entry in sorted(page):
        if not (app / entry).exists():
            problems.append(f"page table: sbir_app/{entry} does not exist")
    problems += [f"page table: sbir_app/{p.name} is not named" for p in sorted(app.glob("*.py"))
                 if p.name != "__init__.py" and p.name not in page]
    # dotted module names in the prose and the flow chart (`gallery.index`, `sbir_core.service`)
    pattern = r"\b(?:sbir_core\.)?(" + "|".join(subpackages) + r")\.([a-z_]+)\b"
    for sub, mod in sorted(set(re.findall(pattern, text))):
        if not (pkg / sub / f"{mod}.py").is_file() and mod not in ("json", "py", "md"):
            problems.append(f"`{sub}.{mod}` names no module")
    for path in sorted(set(re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|js|css|html|md))[`:]", text))):
        if not any((base / path).exists() for base in (ROOT, pkg, app)):
            problems.append(f"`{path}` does not exist")
    # the public API it lists: names sbir_core/__init__.py exports
    api = re.search(r"is the public API[^:]*:(.*?)(?:\n\n|$)", text, re.S)
    if api and (pkg / "__init__.py").is_file():
        exports = next((ast.literal_eval(n.value) for n in ast.parse((pkg / "__init__.py").read_text()).body
                        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_EXPORTS"), {})
        problems += [f"public API: `{name}` is not exported by sbir_core"
                     for name in re.findall(r"`(\w+)`", api.group(1)) if name not in exports]
    return problems


def test_architecture_doc_names_what_exists_and_leaves_nothing_out() -> None:
    problems = architecture_doc_problems(DOC.read_text(encoding="utf-8"))
    assert not problems, "docs/ARCHITECTURE.md is out of date:\n" + "\n".join(problems)


def test_the_doc_check_can_fail(tmp_path) -> None:
    """The check itself, on a made-up package and doc: each kind of stale statement is caught."""
    pkg, app = tmp_path / "sbir_core", tmp_path / "sbir_app"
    for f in ("errors.py", "gallery/__init__.py", "gallery/index.py", "gallery/build.py", "data/__init__.py",
              "data/strokes.py"):
        (pkg / f).parent.mkdir(parents=True, exist_ok=True)
        (pkg / f).write_text("")
    app.mkdir()
    (app / "page.py").write_text("")
    good = ("| layer | package | concern |\n|---|---|---|\n| 0 | `errors.py` | errors |\n"
            "| 1 | `data/` | `strokes` (the reader, `Strokes`, `read`) |\n"
            "| 3 | `gallery/` | `index` (load, search), `build`; made by `gallery.build` |\n\n"
            "| module | concern |\n|---|---|\n| `page.py` | layout |\n")
    assert architecture_doc_problems(good, pkg, app) == []
    cases = {
        "`train` is not a module": good.replace("`build`;", "`build`, `train`;"),
        "module `build` is not listed": good.replace(", `build`;", ";"),
        "sbir_core/data/ is not named": good.replace(
            "| 1 | `data/` | `strokes` (the reader, `Strokes`, `read`) |\n", ""),
        "layer 2 in the doc": good.replace("| 1 | `data/`", "| 2 | `data/`"),
        "sbir_app/served.py does not exist": good + "| `served.py` | pictures |\n",
        "`gallery.relation` names no module": good + "\nthen `gallery.relation` re-ranks\n",
    }
    for expected, doc in cases.items():
        assert expected in " ".join(architecture_doc_problems(doc, pkg, app)), expected
    (pkg / "__init__.py").write_text('_EXPORTS = {"Gallery": "sbir_core.gallery.index"}\n')
    api = "\n`sbir_core/__init__.py` is the public API (lazy): `Gallery`, `Hit`, the errors.\n"
    assert "`Hit` is not exported" in " ".join(architecture_doc_problems(good + api, pkg, app))
    assert architecture_doc_problems(good + api.replace(", `Hit`", ""), pkg, app) == []
    (app / "pacing.py").write_text("")
    assert "sbir_app/pacing.py is not named" in " ".join(architecture_doc_problems(good, pkg, app))
