"""The import graph: the bottom layer (`core/`) imports nothing of the package (read from the source, function-
level imports included, so a lazy import cannot hide an upward one)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_qpeft"


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add("lightning_qpeft.<relative>")
    return found


def package_imports(folder: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): {m for m in imports_of(p) if m.startswith("lightning_qpeft")}
            for p in (PACKAGE / folder).rglob("*.py")}


def test_core_imports_nothing_of_the_package():
    graph = package_imports("core")
    assert graph and all(not deps for deps in graph.values()), graph


def test_the_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lightning_qpeft.model import module\n    import lightning_qpeft.cli\n")
    assert imports_of(module) == {"lightning_qpeft.model", "lightning_qpeft.cli"}
