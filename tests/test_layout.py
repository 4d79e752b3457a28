"""The package tree keeps the architecture's rules: no import circles, a pure core, one runner.

Imports are read from the source (every `import`, including those inside functions), so a
lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("canary", "analysis")
EDGE_LIBRARIES = ("aiohttp", "kubernetes_asyncio", "prometheus_api_client", "requests")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"  # `from pkg import module`
    # importlib.import_module("canary.x") is an import too
    for match in re.finditer(r"import_module\(\s*[\"']([\w.]+)[\"']", path.read_text()):
        yield match.group(1)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets: set[str] = set()
        for name in _imports(module, path):
            if name in MODULES and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    """No import circle anywhere in canary/ or analysis/, lazy imports included."""
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    """The check above can fail: a two-module circle and a three-module one are found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]


def test_the_core_and_the_statistics_never_touch_the_network() -> None:
    """canary.core and analysis import no HTTP or cluster client, and no other canary package."""
    for module, path in MODULES.items():
        if not module.startswith(("canary.core", "analysis")):
            continue
        for name in _imports(module, path):
            top = name.split(".")[0]
            assert top not in EDGE_LIBRARIES, f"{module} imports {name}"
            if name.startswith("canary.") and not name.startswith("canary.core"):
                raise AssertionError(f"{module} imports {name}: the core imports only itself")


def test_analysis_holds_statistics_only() -> None:
    """No report rendering (HTML, Markdown, SVG) is left in analysis/."""
    for module, path in MODULES.items():
        if module.startswith("analysis"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"<(html|svg|table|div)\b", text), module
            assert "render_markdown" not in text and "render_html" not in text, module


def test_every_package_says_what_it_owns() -> None:
    """Each package's __init__ has a docstring that says what it may import."""
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{module} has no docstring"
        if module.count(".") == 1:
            assert "import" in doc, f"{module}'s docstring does not say what it may import"


def test_readme_layout_is_generated_from_the_tree() -> None:
    """The README's Project layout section is what scripts/readme_layout.py makes of the tree."""
    import runpy

    layout = runpy.run_path(str(ROOT / "scripts" / "readme_layout.py"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert layout["updated"](readme) == readme, "run scripts/readme_layout.py"
    for package in ("core/", "runner/", "kubernetes/", "clusters/", "reports/", "cli/"):
        assert f"\n  {package}" in layout["tree"](), package
