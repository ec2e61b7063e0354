"""The import graph of `lightning_qpeft`, read from the source with `ast`, against the layering below.

Every import counts: module-level, function-level (a lazy import cannot hide an upward edge or a cycle), under
`if TYPE_CHECKING:`, and relative (`from . import x`, `from ..core import y`, resolved against the importer).

A unit is a sub-package (`core`, `data`, ...) or a top-level module (`cli`, `merge`, ...); `lightning_qpeft`
is the package's own `__init__`. `ALLOWED[unit]` lists the units it may import besides itself:

    unit                          may import                            what it is
    core                          -                                     constants, token and tensor checks,
                                                                        errors: the bottom
    lightning_qpeft (__init__)    -                                     the package's docstring and version
    utils                         core                                  domain-free helpers (atomic files, FLOPs,
                                                                        profiling)
    checkpointing, distributed,   core, utils                           runtime helpers the model and the CLI
    config_ranges, failed_runs                                          share (checkpoint IO and RNG state, DDP/
                                                                        FSDP strategies, range checks, cleanup)
    tasks                         core                                  a task's text: prompt templates, MMLU's
                                                                        question format and categories, the
                                                                        generated tasks
    base_models                   core, utils, tasks                    `model.base_model` -> a folder and its
                                                                        tokenizer (hub id, folder, tiny, GGUF)
    model                         core, utils, runtime helpers,         the trainable model: quantize, adapt,
                                  base_models                           QPeftModule
    data                          core, utils, tasks, base_models       records -> tokens -> batches
    evaluation                    core, utils, tasks                    pure scoring
    callbacks                     model, data, evaluation and below     Lightning glue
    cli                           callbacks and below                   the LightningCLI
    merge, fetch, chat            callbacks and below                   the other commands, beside cli
    study                         cli and below                         a cell runs the LightningCLI in-process
                                                                        (its precheck too); cli never imports it
    __main__                      any                                   names every command

Never upward: model, data and evaluation import no callbacks, study or cli; data, evaluation and model do not
import each other (what two of them share lives in core, tasks or base_models). The unit graph has no cycle,
and neither have the modules inside any one unit (study's runner returns results; reports are functions of them).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_qpeft"
NAME = "lightning_qpeft"

RUNTIME = {"checkpointing", "distributed", "config_ranges", "failed_runs"}
BOTTOM = {"core", "utils", NAME} | RUNTIME
BELOW_CALLBACKS = BOTTOM | {"tasks", "base_models", "model", "data", "evaluation"}
BELOW_CLI = BELOW_CALLBACKS | {"callbacks"}
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    NAME: set(),
    "utils": {"core"},
    **{helper: {"core", "utils"} for helper in RUNTIME},
    "tasks": {"core"},
    "base_models": {"core", "utils", "tasks"},
    "model": {"core", "utils", "base_models"} | RUNTIME,
    "data": {"core", "utils", "tasks", "base_models"},
    "evaluation": {"core", "utils", "tasks"},
    "callbacks": BELOW_CALLBACKS,
    "cli": BELOW_CLI,
    "merge": BELOW_CLI,
    "fetch": BELOW_CLI,
    "chat": BELOW_CLI,
    "study": BELOW_CLI | {"cli"},
    "__main__": BELOW_CLI | {"cli", "study", "merge", "fetch", "chat"},
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(source: str, module: str, is_package: bool, known: set[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, imported module) for every import of `source`, relative ones resolved against `module`.

    `from X import a` imports `X.a` when that is a module (`known`), else `X` (a name defined in X).
    """
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here[: len(here) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return found


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else NAME


def package_edges() -> list[tuple[str, int, str, str]]:
    """(file, line, importer, imported) for every import of a `lightning_qpeft` module by another."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = []
    for module, path in sorted(files.items()):
        for line, target in imports_in(path.read_text(encoding="utf-8"), module, path.name == "__init__.py",
                                       set(files)):
            edge = (str(path.relative_to(PACKAGE.parent)), line, module, target)
            if (target == NAME or target.startswith(NAME + ".")) and target != module and edge not in edges:
                edges.append(edge)
    return edges


def violations(edges: list[tuple[str, int, str, str]]) -> list[str]:
    out = []
    for file, line, importer, imported in edges:
        src, dst = unit_of(importer), unit_of(imported)
        if src != dst and dst not in ALLOWED.get(src, set()):
            out.append(f"{file}:{line}: {importer} -> {imported} ({src} may import: "
                       f"{', '.join(sorted(ALLOWED.get(src, set()))) or 'nothing of the package'})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_report(edges: list[tuple[str, int, str, str]], key) -> list[str]:
    """Each cycle of the graph `key(module)` induces, with the imports that close it."""
    graph: dict[str, set[str]] = {}
    for _, _, a, b in edges:
        if key(a) is not None and key(b) is not None and key(a) != key(b):
            graph.setdefault(key(a), set()).add(key(b))
    out = []
    for component in cycles(graph):
        members = set(component)
        lines = [f"{file}:{line}: {a} -> {b}" for file, line, a, b in edges
                 if key(a) in members and key(b) in members and key(a) != key(b)]
        out.append(" <-> ".join(component) + ":\n    " + "\n    ".join(lines))
    return out


# ---------------------------------------------------------------------------------------------- the package
def test_every_unit_has_a_place_in_the_table():
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(ALLOWED), f"place these in ALLOWED (tests/test_layers.py): {sorted(units - set(ALLOWED))}"


def test_imports_point_down():
    edges = package_edges()
    assert len(edges) > 100  # the walk sees the package
    bad = violations(edges)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_core_imports_nothing_of_the_package():
    # core's modules may build on each other (DataError is a ConfigError), never on the rest of the package
    core = [e for e in package_edges() if unit_of(e[2]) in ("core", NAME) and unit_of(e[3]) != "core"]
    assert not core, core


def test_no_cycle_between_units():
    found = cycle_report(package_edges(), unit_of)
    assert not found, "cycles between units:\n" + "\n".join(found)


def test_no_cycle_inside_a_unit():
    found = []
    for unit in sorted(ALLOWED):
        found += cycle_report(package_edges(), lambda m, u=unit: m if unit_of(m) == u else None)
    assert not found, "cycles between modules:\n" + "\n".join(found)


def test_ignore_index_is_defined_once():
    """The label the loss skips lives in core/tokens.py; nothing else defines it or passes -100 for it."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if any("IGNORE_INDEX" in n.upper() for n in names):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.keyword) and node.arg == "ignore_index" and not isinstance(node.value, ast.Name):
                found.append(f"{path.relative_to(PACKAGE)}:{node.value.lineno} ignore_index=<literal>")
    assert [f.split(":")[0] for f in found] == ["core/tokens.py"], found


# ---------------------------------------------------------------------------------------------- the checker
def test_the_walk_sees_lazy_relative_and_type_checking_imports():
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from lightning_qpeft.study.runner import StudyRunner\n"
              "def f():\n    from lightning_qpeft.model import module\n    import lightning_qpeft.cli\n"
              "    from . import collate\n    from ..callbacks.numerics import NonFiniteGuard\n"
              "    from .. import core\n")
    known = {"lightning_qpeft.model.module", "lightning_qpeft.data.collate", "lightning_qpeft.core"}
    assert imports_in(source, "lightning_qpeft.data.sources", False, known) == [
        (1, "typing"), (3, "lightning_qpeft.study.runner"), (5, "lightning_qpeft.model.module"),
        (6, "lightning_qpeft.cli"), (7, "lightning_qpeft.data.collate"), (8, "lightning_qpeft.callbacks.numerics"),
        (9, "lightning_qpeft.core")]
    # in a package's __init__, `.` is the package itself
    assert imports_in("from .numerics import X\n", "lightning_qpeft.callbacks", True) == [
        (1, "lightning_qpeft.callbacks.numerics")]


def test_an_upward_import_is_named():
    q = "lightning_qpeft"
    edges = [(f"{q}/model/module.py", 37, f"{q}.model.module", f"{q}.callbacks.numerics"),
             (f"{q}/data/datamodule.py", 45, f"{q}.data.datamodule", f"{q}.model.loading"),
             (f"{q}/callbacks/mmlu.py", 9, f"{q}.callbacks.mmlu", f"{q}.model.loading")]  # allowed
    bad = violations(edges)
    assert len(bad) == 2
    assert bad[0].startswith(f"{q}/model/module.py:37: {q}.model.module -> {q}.callbacks.numerics (model may import: ")
    assert bad[1].startswith(f"{q}/data/datamodule.py:45: {q}.data.datamodule -> {q}.model.loading (data may import: ")


def test_a_cycle_is_named():
    edges = [("s/runner.py", 1, "p.study.runner", "p.study.report"),
             ("s/report.py", 2, "p.study.report", "p.study.plots"),
             ("s/plots.py", 3, "p.study.plots", "p.study.runner"),
             ("s/cli.py", 4, "p.study.cli", "p.study.runner")]  # not part of the cycle
    (found,) = cycle_report(edges, lambda m: m)
    assert found.startswith("p.study.plots <-> p.study.report <-> p.study.runner:")
    assert "s/plots.py:3: p.study.plots -> p.study.runner" in found and "cli" not in found
