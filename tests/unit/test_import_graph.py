"""The package's import graph, read from the source (every import statement, those inside functions
included): no cycle anywhere in glm/, and no arrow from glm/ up to the service or the tooling around it."""
from __future__ import annotations

import ast
from pathlib import Path

GLM = Path(__file__).resolve().parents[2] / "glm"
OUTSIDE = ("predict", "script", "bench", "tests")  # what glm/ must never import


def module_name(path: Path) -> str:
    parts = path.relative_to(GLM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every module `path` imports, by its full name. `from X import n` is an arrow to X.n when n is
    a module, else to X; the packages above the importer itself are not arrows (Python imports a
    module's parents before the module, so they say nothing about its own dependencies)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(path).split(".")
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    me = module_name(path)
    return {m for m in found if not me.startswith(m + ".")} - {me}


def graph() -> dict[str, set[str]]:
    paths = sorted(GLM.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if n not in edges:
                continue  # outside the package (torch, triton, ...)
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_reader_sees_the_imports_it_must_judge():
    edges = graph()
    assert "glm.ops" in edges["glm.model"] and "glm.kvpool" in edges["glm.model"]
    assert {"glm.ops", "glm.cpu.kernels"} <= edges["glm.cpu.ops"]
    assert {"glm.ops", "glm.gpu.attention", "glm.gpu.linear", "glm.gpu.pointwise"} <= edges["glm.gpu.ops"]
    assert {"glm.gpu.ops", "glm.cpu.ops", "glm.pipeline"} <= edges["glm.loader"]  # imports inside functions count
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_the_package():
    assert cycle(graph()) is None


def test_the_models_compute_only_through_their_ops():
    edges = graph()
    for model in ("glm.model", "glm.model_v1"):
        assert not {m for m in edges[model] if m.startswith(("glm.cpu", "glm.gpu"))}, model
    for backend in ("glm.cpu", "glm.gpu"):
        assert not {(m, n) for m, ns in edges.items() if m.startswith(backend) for n in ns
                    if n in ("glm.model", "glm.model_v1")}, backend


def test_nothing_in_the_package_imports_the_service_or_its_tools():
    arrows = {(m, n) for m, ns in graph().items() for n in ns if n.split(".")[0] in OUTSIDE}
    assert not arrows
