"""The reports package keeps the layering its docstring states (canary/reports/__init__.py).

The renderers are pure: entries in, strings out. Only ``pages`` touches files, the network or
other canary packages, and nothing in the package imports ``pages`` (it imports the package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import canary.reports

PACKAGE = Path(canary.reports.__file__).parent
# model <- build; model <- charts <- html; model <- markdown, jsondoc; formatting for all.
LAYERS = {
    "formatting": set(),
    "model": set(),
    "build": {"formatting", "model"},
    "charts": {"formatting", "model"},
    "html": {"formatting", "model", "charts"},
    "markdown": {"formatting", "model"},
    "jsondoc": {"formatting", "model"},
    "__init__": {"model", "build", "html", "markdown", "jsondoc"},
}
# Pure modules of other packages a renderer may use: redaction masks secrets on the way in.
PURE_CANARY = {"canary.core.redact"}
PURE_LIBRARIES = {
    "__future__",
    "analysis",
    "collections",
    "dataclasses",
    "datetime",
    "html",
    "json",
    "math",
    "pydantic",
    "typing",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module or "")
    return names


def test_the_package_holds_the_modules_its_docstring_lists() -> None:
    """Every module is listed in the docstring and in LAYERS (pages and cluster, the I/O
    ones, aside), and vice versa."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == {*LAYERS, "pages", "cluster"}
    doc = canary.reports.__doc__ or ""
    for module in modules - {"__init__"}:
        assert f"\n    {module} " in doc, f"{module} is not in canary/reports/__init__.py"


def test_report_modules_are_pure_and_layered() -> None:
    """No renderer imports pages, another canary package or an I/O library, and each imports
    only the report modules below it."""
    for module, allowed in LAYERS.items():
        for name in _imports(PACKAGE / f"{module}.py"):
            if name in PURE_CANARY:
                continue
            if name.startswith("canary."):
                assert name.startswith("canary.reports."), f"{module} imports {name}"
                assert name.removeprefix("canary.reports.") in allowed, f"{module} imports {name}"
            else:
                top = name.split(".")[0]
                assert top in PURE_LIBRARIES, f"{module} imports {name}"
