"""The package's import graph, read from the source (every import statement, those inside functions
included): no cycle anywhere in glm/, no arrow from glm/ up to the service or the tooling around it,
and none between the tests and the commands in script/ (both import devtools/ instead)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GLM = REPO / "glm"
OUTSIDE = ("predict", "script", "bench", "tests", "devtools")  # what glm/ must never import
# How a file can run another by its path instead of importing it.
LOADERS = {"SourceFileLoader", "spec_from_file_location", "run_path", "exec_module"}


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
    assert {"glm.gpu.ops", "glm.cpu.ops"} <= edges["glm.loader"] and "glm.loader" in edges["glm.llm"]  # imports inside functions count
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


# ---- tests/ and script/
def python_sources(folder: Path) -> list[Path]:
    """folder's Python files: *.py and the executables whose #! line names python (script/deploy)."""
    def is_python(p: Path) -> bool:
        if p.suffix == ".py":
            return True
        with open(p, "rb") as fh:
            first = fh.readline()
        return not p.suffix and first.startswith(b"#!") and b"python" in first
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts and is_python(p)]


def top_imports(path: Path) -> set[str]:
    """The first name of every module `path` imports (`from a.b import c` -> a); relative imports
    count as their own folder's."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module.split(".")[0] if node.module and not node.level else path.parent.name)
    return found


def names_used(path: Path) -> set[str]:
    """Every name and attribute the code uses, and every string constant in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def test_tests_and_script_are_read_whole():
    tests = {p.relative_to(REPO).as_posix() for p in python_sources(REPO / "tests")}
    assert {"tests/conftest.py", "tests/service_helpers.py", "tests/unit/test_import_graph.py",
            "tests/service/test_cog_deploy.py"} <= tests
    script = {p.name for p in python_sources(REPO / "script")}
    assert {"deploy", "download-weights", "openapi-schema"} <= script and "test" not in script  # bash
    assert top_imports(REPO / "script" / "deploy") == {"os", "sys", "devtools"}


def test_tests_never_import_or_load_script():
    for path in python_sources(REPO / "tests"):
        assert "script" not in top_imports(path), path
        if path != Path(__file__).resolve():
            assert not names_used(path) & LOADERS, f"{path} loads a file by path; import it from devtools/"


def test_script_never_imports_or_reaches_into_tests():
    test_modules = {"tests"} | {p.stem for p in python_sources(REPO / "tests")}
    for path in python_sources(REPO / "script"):
        assert not top_imports(path) & test_modules, path
        assert "tests" not in names_used(path), f"{path} names tests/ (a sys.path entry?)"
