"""The house's layout rules, checked on the source (issue #15): imports run one way and in no circle, `app/` keeps
at most 8 top-level modules, no function runs over 60 lines, and the formatter is trusted (at most 10 `fmt: skip`).

These read the code as text and syntax trees; nothing is imported or run.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Imports run from a higher layer to a lower one or within a layer: cli -> web -> jobs/serving -> services -> core.
LAYERS = {"cli": 4, "web": 3, "jobs": 2, "serving": 2, "services": 1}
CORE = 0


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of a top-level package."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that a file imports when it runs, wherever the import sits (inside functions too);
    imports under `if TYPE_CHECKING:` are for the type checker only and never run."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def _graph(package: str) -> dict[str, set[str]]:
    known = _modules(package)
    return {module: _imported(path, known) - {module} for module, path in known.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], CORE) if len(parts) > 1 else CORE


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path that closes it (depth-first search, three colours). A package's
    `__init__` importing its own submodules is not a circle of the design: edges into a package's own children
    from the package are kept, edges from a child up to its package's `__init__` are the ones that would close it."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a submodule reaching its package: ordinary attribute access
                continue
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_app_has_no_import_circle():
    assert _cycles(_graph("app")) == []


def test_ml_has_no_import_circle():
    assert _cycles(_graph("ml")) == []


def test_app_imports_run_one_way_from_cli_to_the_core():
    graph = _graph("app")
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(module)
    )
    assert upward == []


def test_ml_never_imports_app():
    offenders = []
    for path in sorted((ROOT / "ml").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "app" or n.startswith("app.")]
    assert offenders == []


def test_app_keeps_at_most_eight_top_level_modules():
    modules = sorted(p.name for p in (ROOT / "app").glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 8, modules


@pytest.mark.parametrize("package", ["app", "ml"])
def test_no_function_runs_over_60_lines(package):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - first + 1 > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long == []


def test_the_formatter_is_overridden_at_most_ten_times_each_with_a_reason():
    marker = "# fmt: " + "skip"  # spelled apart, so that this file is not one of the places
    skips = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for folder in ("app", "ml", "bench", "tests", "migrations")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line in path.read_text().splitlines()
        if marker in line
    ]
    assert len(skips) <= 10, skips
    assert [s for s in skips if not s.split(marker, 1)[1].strip(" -—:;")] == []  # each says why after the marker
