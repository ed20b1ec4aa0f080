"""The house rules that keep lpld readable: one idea per module (about 400 lines at most) and no
import cycle between its modules, counting imports made inside functions too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lpld": ROOT / "lpld", "lpld_kernels": ROOT / "kernels"}
MAX_LINES = 420  # "about 400": a module past this has grown a second idea


def _modules() -> dict[str, Path]:
    return {f"{package}.{path.stem}": path for package, folder in PACKAGES.items() for path in folder.glob("*.py")
            if path.stem != "__init__"}


def _imports(module: str, path: Path) -> set[str]:
    """The package modules ``module`` imports, anywhere in its source."""
    package = module.split(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found |= {f"{package}.{name.split('.')[0]}" for name in names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            parts = node.module.split(".")
            found |= {".".join(parts[:2])} if len(parts) > 1 else {f"{parts[0]}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[:2]) for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found & set(_modules()) - {module}


def test_no_module_is_over_about_400_lines():
    sizes = {module: len(path.read_text().splitlines()) for module, path in _modules().items()}
    assert {module: size for module, size in sizes.items() if size > MAX_LINES} == {}


def test_no_import_cycle():
    graph = {module: _imports(module, path) for module, path in _modules().items()}
    state: dict[str, str] = {}

    def visit(module, trail):
        state[module] = "open"
        for dependency in sorted(graph[module]):
            assert state.get(dependency) != "open", " -> ".join(trail + [module, dependency])
            if dependency not in state:
                visit(dependency, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert graph["lpld.recover"] and graph["lpld.report"]  # the reader sees imports at all
