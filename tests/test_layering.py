"""The package's import graph points one way: the library never imports a command-line program, the notebooks'
support package or the figures, and no two modules import each other (directly or through others).

Every ``import`` / ``from ... import`` statement counts, also those inside functions (lazy imports still couple).
"""

import ast
from pathlib import Path

import uniperceiver_v2

PACKAGE = Path(uniperceiver_v2.__file__).parent
NAME = "uniperceiver_v2"
CLI = {f"{NAME}.{name}" for name in ("train", "evaluate", "pretrain_backbone", "reproduce")}
# Modules that are not the library: the command-line programs, the notebooks' support, benchmarks and figures.
NOT_LIBRARY = (f"{NAME}.walkthrough", f"{NAME}.bench", f"{NAME}.viz", *CLI)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from .x import y`` counts for ``x.y`` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != NAME:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def is_library(module: str) -> bool:
    return not any(module == prefix or module.startswith(prefix + ".") for prefix in NOT_LIBRARY)


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert f"{NAME}.model" in graph[f"{NAME}.engine.build"]
    assert f"{NAME}.engine.runtime" in graph[f"{NAME}.api"]
    assert f"{NAME}.walkthrough.pipeline" in graph[f"{NAME}.walkthrough.runs"]       # a relative import


def test_no_library_module_imports_a_cli_the_walkthrough_benchmarks_or_figures():
    graph = import_graph()
    offending = {module: sorted(m for m in imports if not is_library(m))
                 for module, imports in graph.items() if is_library(module)}
    assert {module: bad for module, bad in offending.items() if bad} == {}


def test_nothing_imports_a_command_line_program_but_its_own_entry_point():
    graph = import_graph()
    # notebook support may read the trainer's own argument parser (to show a command's config); nothing else
    allowed = {(f"{NAME}.walkthrough.runs", f"{NAME}.train")}
    offending = sorted((module, target) for module, imports in graph.items() for target in imports
                       if target in CLI and (module, target) not in allowed and not module.endswith("__main__"))
    assert offending == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # Package __init__ files that only re-export their own submodules would form trivial cycles with them.
    edges = {module: {t for t in imports if not module.startswith(t + ".")} for module, imports in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
