"""The layers depend one way: db <- billing <- graph. The sandbox and the domain stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("db", "billing", "graph")


def imported_modules(source: str) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def layer_of(path: Path) -> str:
    relative = path.relative_to(ROOT)
    if relative.parts[:2] == ("billing", "sandbox"):
        return "sandbox"
    return relative.parts[0]


def forbidden_for(layer: str, module_path: Path) -> tuple[str, ...]:
    """Module prefixes a file of `layer` must not import."""
    if layer == "db":
        return ("billing", "graph", "strawberry", "fastapi", "stripe")
    if layer == "billing":
        return ("graph", "strawberry", "fastapi", "billing.sandbox")
    if layer == "sandbox":
        # An emulator that shared code with what it checks could not catch its bugs.
        return ("graph", "strawberry", "db")
    if layer == "graph" and module_path.name != "app.py":
        return ("billing.sandbox",)  # only the app factory mounts the sandbox
    return ()


def violations(path: Path, source: str) -> list[str]:
    layer = layer_of(path)
    banned = forbidden_for(layer, path)
    found = []
    for module in sorted(imported_modules(source)):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in banned):
            found.append(f"{path.relative_to(ROOT)} imports {module}")
        if layer == "sandbox" and module.startswith("billing.") and not module.startswith("billing.sandbox"):
            found.append(f"{path.relative_to(ROOT)} imports domain module {module}")
    return found


def project_files() -> list[Path]:
    return [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]


def test_every_module_respects_the_layers() -> None:
    problems = [problem for path in project_files() for problem in violations(path, path.read_text())]
    assert problems == []


def test_the_project_has_modules_in_every_layer() -> None:
    layers = {layer_of(path) for path in project_files()}
    assert {"db", "billing", "graph"} <= layers


@pytest.mark.parametrize(
    ("relative", "source"),
    [
        ("db/x.py", "from billing.settings import Settings"),
        ("billing/x.py", "import strawberry"),
        ("billing/x.py", "from graph.app import create_app"),
        ("billing/x.py", "from billing.sandbox.api import router"),
        ("billing/sandbox/x.py", "from billing.plans import Catalog"),
        ("billing/sandbox/x.py", "from db.models import metadata"),
        ("graph/schema.py", "import billing.sandbox"),
    ],
)
def test_the_checker_catches_a_violation(relative: str, source: str) -> None:
    assert violations(ROOT / relative, source) != []


def test_the_checker_allows_the_intended_direction() -> None:
    assert violations(ROOT / "billing/x.py", "from db.models import BillingAccount") == []
    assert violations(ROOT / "graph/app.py", "from billing.sandbox import app") == []
    assert violations(ROOT / "billing/sandbox/x.py", "from billing.sandbox.store import y") == []
