"""The source tree is the import tree: `imagegen.common.x` is `imagegen/common/x.py` (a committed symlink to the
top-level `common/`), nothing else of the checkout is reachable as `imagegen.*`, no module patches `sys.path`
or names `common`/`services` as top-level packages, and no two modules import each other, even inside functions.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Module prefix -> folder. imagegen/common and imagegen/services are walked through their real folders, once.
SOURCES = {
    "imagegen": ROOT / "imagegen",
    "imagegen.common": ROOT / "common",
    "imagegen.services": ROOT / "services",
    "imagegen_client": ROOT / "clients" / "python" / "imagegen_client",
    "bench": ROOT / "bench",
    "tests": ROOT / "tests",
    "tools": ROOT / "tools",
}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if prefix == "imagegen" and parts[0] in ("common", "services"):
                continue  # the symlinks: the same files as imagegen.common / imagegen.services
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((prefix, *parts))] = path
    return found


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: (source, is_package)} -> {module: the modules of `sources` it imports}, at any depth of the AST
    (function-level imports included: they close a cycle as soon as the function runs; `if TYPE_CHECKING:`
    blocks left out: they never run)."""
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, (source, is_package) in sources.items():
        for node in _runtime_nodes(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package the module is in
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}".rstrip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in sources}
    return graph


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except those inside an `if TYPE_CHECKING:` block."""
    nodes, pending = [], [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def test_cycle_check_finds_a_function_level_cycle():
    sources = {
        "pkg": ("", True),
        "pkg.cli": ("def run():\n    from pkg.sdk import call\n", False),
        "pkg.sdk": ("from . import cli\n", False),
        "pkg.other": ("import pkg.cli\n", False),
    }
    assert cycles(import_graph(sources)) == [["pkg.cli", "pkg.sdk"]]


def test_no_import_cycle_and_no_top_level_server_packages():
    modules = _modules()
    assert {"imagegen.cli", "imagegen.common.kernels", "imagegen.services.denoiser", "tests.parity"} <= set(modules)
    sources = {name: (path.read_text(), path.name == "__init__.py") for name, path in modules.items()}
    assert cycles(import_graph(sources)) == []
    for name, (source, _) in sources.items():
        for node in ast.walk(ast.parse(source)):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                imported = [node.module or ""]
            # common/services only ever as imagegen.common/imagegen.services: a second import under the bare
            # name would be a second copy of every module (its locks, metrics and torch.library ops).
            assert not [m for m in imported if m.split(".")[0] in ("common", "services", "v1")], name
            is_sys_path = isinstance(node, ast.Attribute) and node.attr == "path" and _is_name(node.value, "sys")
            assert not is_sys_path, f"{name} uses sys.path: the venv (scripts/setup-venv) provides the packages"


def test_the_checkout_is_a_valid_import_tree():
    for name in ("common", "services"):
        link = ROOT / "imagegen" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}", link  # relative: valid in any clone
    assert "__path__" not in (ROOT / "imagegen" / "__init__.py").read_text()
    assert "sys.modules" not in (ROOT / "imagegen" / "v1" / "__init__.py").read_text()
    # From the checkout's root, as a newcomer runs Python there: only imagegen/ is the imagegen package.
    probe = (
        "import importlib.util as u, imagegen.common.errors as e, imagegen.services as s\n"
        "print(e.__file__, s.__file__)\n"
        "for name in ('imagegen.tests', 'imagegen.imagegen', 'imagegen.bench', 'imagegen.tools', 'imagegen.helm'):\n"
        "    assert u.find_spec(name) is None, name\n"
    )
    result = subprocess.run([sys.executable, "-B", "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    errors, services = result.stdout.split()
    assert Path(errors) == ROOT / "imagegen" / "common" / "errors.py"
    assert Path(services) == ROOT / "imagegen" / "services" / "__init__.py"
