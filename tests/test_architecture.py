"""The shape of the house: imports only go down the floors (pyproject's import-linter contract), every module is on
a floor, no two modules import each other in a circle, and no module grows past a page or two."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).parent.parent
MAX_LINES = 420  # "roughly 100-400 lines" (docs/architecture.md)


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": ""})


def test_imports_only_go_down_the_floors():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_every_module_of_the_package_is_on_a_floor():
    named = {m.strip() for layer in _layers() for m in layer.split("|")}
    top = {f"vlm.{p.stem}" for p in (ROOT / "vlm").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}  # fmt: skip
    assert top - named == set(), "add these to a floor in pyproject.toml and docs/architecture.md"
    assert named - top == set(), "the contract names modules that do not exist"


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("vlm", exclude_type_checking_imports=True)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    cycles = _strongly_connected(edges)
    assert cycles == [], f"modules importing each other in a circle: {cycles}"


def test_the_floor_check_fails_on_an_upward_import(tmp_path):
    """The contract is not vacuous: the same check on a package whose low floor imports a high one fails."""
    pkg = tmp_path / "vlm"
    for name in ("models", "tasks"):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "clip.py").write_text("def f():\n    from vlm.tasks import contrastive  # inside a function\n")
    (pkg / "tasks" / "contrastive.py").write_text("import vlm.models.clip\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.importlinter]\nroot_package = "vlm"\n[[tool.importlinter.contracts]]\nname = "floors"\n'
        'type = "layers"\nlayers = ["vlm.tasks", "vlm.models"]\n'
    )
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "vlm.models.clip -> vlm.tasks" in result.stdout, result.stdout[-2000:]
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _strongly_connected(edges) == [["a", "b", "c"]]


# Modules named by a string (imported by importlib at run time, where the import contract cannot see them) on a floor
# above the module naming them, with the reason each is allowed. Anything else is an upward import in disguise.
UPWARD_BY_NAME = {
    ("vlm.formats", "vlm.tasks"): "BUILDABLE: the registry of the classes a config may name (class_path), so a file "
                                  "builds only vlm's own task, optimizer and schedule classes",
}
_DOTTED = re.compile(r"^vlm(\.[A-Za-z_]\w*)+$")


def _floor_numbers() -> dict[str, int]:
    layers = _layers()
    return {m.strip(): len(layers) - i for i, layer in enumerate(layers) for m in layer.split("|")}


def _upward_names(package: Path) -> dict[tuple[str, str], set[str]]:
    """(naming floor, named floor) -> the dotted ``vlm.`` strings in ``package``'s code that name a higher floor."""
    floors = _floor_numbers()
    found: dict[tuple[str, str], set[str]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        source = ".".join(parts[:2])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.match(node.value):
                target = ".".join(node.value.split(".")[:2])
                if floors.get(target, 0) > floors.get(source, len(floors) + 1):
                    found.setdefault((source, target), set()).add(node.value)
    return found


def test_modules_named_by_string_follow_the_floors_too():
    """importlib references (``"vlm.tasks.contrastive.ContrastiveTask"``) are imports the contract cannot see: every
    one that names a higher floor is listed in UPWARD_BY_NAME with its reason."""
    unexplained = {k: sorted(v) for k, v in _upward_names(ROOT / "vlm").items() if k not in UPWARD_BY_NAME}
    assert unexplained == {}, f"modules named by string on a higher floor: {unexplained}"


def test_the_by_name_check_sees_an_upward_string(tmp_path):
    pkg = tmp_path / "vlm" / "models"
    pkg.mkdir(parents=True)
    (pkg / "clip.py").write_text('import importlib\nTASK = importlib.import_module("vlm.tasks.contrastive")\n')
    assert _upward_names(tmp_path / "vlm") == {("vlm.models", "vlm.tasks"): {"vlm.tasks.contrastive"}}


def test_the_library_never_imports_the_benchmarks():
    graph = grimp.build_graph("vlm", include_external_packages=True, exclude_type_checking_imports=True)
    assert "benchmarks" not in graph.modules


def test_no_module_is_longer_than_a_few_pages():
    files = [p for package in ("vlm", "benchmarks") for p in (ROOT / package).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules: {long}"


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of two or more nodes that reach each other (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(groups)
