"""The layers depend one way: db <- billing <- graph <- cli. The Stripe sandbox and the project stay apart."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("db", "billing", "graph", "cli")
SANDBOX = "stripe_sandbox"
PACKAGES = (*PROJECT, SANDBOX)
APP_FACTORY = "graph/app.py"


@dataclass(frozen=True)
class Import:
    module: str
    line: int
    at_import_time: bool  # runs when the importing module is imported (not in a function or TYPE_CHECKING)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, at_import_time: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, at_import_time) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(Import(node.module, node.lineno, at_import_time))
        for child in ast.iter_child_nodes(node):
            deferred = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or (
                isinstance(node, ast.If) and is_type_checking(node.test) and child in node.body
            )
            visit(child, at_import_time and not deferred)

    visit(ast.parse(source), True)
    return found


def layer_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def forbidden_for(layer: str) -> tuple[str, ...]:
    """Module prefixes a file of `layer` must not import."""
    if layer == "db":
        return ("billing", "graph", "cli", SANDBOX, "strawberry", "fastapi", "stripe")
    if layer == "billing":
        return ("graph", "cli", SANDBOX, "strawberry", "fastapi")
    if layer == "graph":
        return ("cli",)
    if layer == "cli":
        return ()
    if layer == SANDBOX:
        # An emulator that shared code with what it checks could not catch its bugs.
        return (*PROJECT, "strawberry")
    raise AssertionError(f"no rules for {layer}")


def violations(path: Path, source: str) -> list[str]:
    relative = path.relative_to(ROOT).as_posix()
    banned = forbidden_for(layer_of(path))
    found = []
    for imported in imports_of(source):
        where = f"{relative}:{imported.line} imports {imported.module}"
        if within(imported.module, banned):
            found.append(where)
        elif within(imported.module, (SANDBOX,)) and layer_of(path) == "graph":
            # Only the app factory's sandbox branch loads it, so a production process never does.
            if relative != APP_FACTORY:
                found.append(where)
            elif imported.at_import_time:
                found.append(f"{where} at import time (import it inside the sandbox branch)")
    return found


def project_files() -> list[Path]:
    return [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]


def test_every_module_respects_the_layers() -> None:
    problems = [problem for path in project_files() for problem in violations(path, path.read_text())]
    assert problems == []


def test_the_project_has_modules_in_every_layer() -> None:
    layers = {layer_of(path) for path in project_files()}
    assert set(PACKAGES) <= layers


def test_the_app_factory_imports_the_sandbox_only_inside_a_function() -> None:
    imports = [i for i in imports_of((ROOT / APP_FACTORY).read_text()) if within(i.module, (SANDBOX,))]
    assert imports != []
    assert not any(i.at_import_time for i in imports)


START_AND_LIST_SANDBOX_MODULES = textwrap.dedent(
    """
    import json, sys
    from fastapi.testclient import TestClient
    from graph.app import create_app

    app = create_app()
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        answer = client.post("/graphql", json={"query": "{ __typename }"})
        assert answer.json() == {"data": {"__typename": "Query"}}, answer.text
    print(json.dumps(sorted(m for m in sys.modules if m == "stripe_sandbox" or m.startswith("stripe_sandbox."))))
    """
)
PRODUCTION = {
    "ENVIRONMENT": "production",
    "STRIPE_SECRET_KEY": "sk_test_production_like_key",
    "STRIPE_WEBHOOK_SECRET": "whsec_production_like_secret",
    "AUTH_JWT_SECRET": "a-production-grade-secret-of-40-characters",
    "METRICS_TOKEN": "a-metrics-token-for-the-scraper-of-40-chars",
}


def sandbox_modules_after_start_up(database_url: str, cwd: Path, settings: dict[str, str]) -> list[str]:
    """Start the app in a fresh interpreter (this one has imported the sandbox for other tests)."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ENVIRONMENT", "STRIPE_", "AUTH_", "SERVICE_", "SANDBOX_", "PUBLIC_BASE_URL"))
    }
    env = {**inherited, "PYTHONPATH": str(ROOT), "DATABASE_URL": database_url, **settings}
    done = subprocess.run(
        [sys.executable, "-c", START_AND_LIST_SANDBOX_MODULES],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_a_production_app_never_loads_the_sandbox(sqlite_url: str, tmp_path: Path) -> None:
    assert sandbox_modules_after_start_up(sqlite_url, tmp_path, PRODUCTION) == []


def test_a_sandbox_mode_app_loads_the_sandbox(sqlite_url: str, tmp_path: Path) -> None:
    """The check above can see the sandbox when it is there."""
    loaded = sandbox_modules_after_start_up(sqlite_url, tmp_path, {"SANDBOX_SYNC_CATALOG": "false"})
    assert "stripe_sandbox.app" in loaded


@pytest.mark.parametrize(
    ("relative", "source"),
    [
        ("db/x.py", "from billing.settings import Settings"),
        ("db/x.py", "from graph.app import create_app"),
        ("db/x.py", "import strawberry"),
        ("db/x.py", "from fastapi import FastAPI"),
        ("db/x.py", "import stripe"),
        ("db/x.py", "import stripe_sandbox"),
        ("db/x.py", "from cli.main import main"),
        ("billing/x.py", "import strawberry"),
        ("billing/x.py", "from fastapi import FastAPI"),
        ("billing/x.py", "from graph.app import create_app"),
        ("billing/x.py", "from stripe_sandbox.api import router"),
        ("billing/x.py", "def f():\n    from stripe_sandbox import engine"),
        ("billing/x.py", "import cli.trigger"),
        ("graph/x.py", "from cli.main import main"),
        ("graph/app.py", "def f():\n    from cli.trigger import trigger"),
        ("stripe_sandbox/x.py", "from billing.plans import Catalog"),
        ("stripe_sandbox/x.py", "from db.models import metadata"),
        ("stripe_sandbox/x.py", "import graph.schema"),
        ("stripe_sandbox/x.py", "import strawberry"),
        ("stripe_sandbox/x.py", "from cli.trigger import DAY"),
        ("graph/schema.py", "import stripe_sandbox"),
        ("graph/schema.py", "def f():\n    from stripe_sandbox.app import Sandbox"),
        ("graph/app.py", "from stripe_sandbox.app import Sandbox"),
        ("graph/app.py", "import stripe_sandbox.app"),
        ("graph/app.py", "if True:\n    from stripe_sandbox.app import Sandbox"),
        ("graph/app.py", "class A:\n    from stripe_sandbox.app import Sandbox"),
        ("graph/app.py", "if TYPE_CHECKING:\n    pass\nelse:\n    import stripe_sandbox"),
    ],
)
def test_the_checker_catches_a_violation(relative: str, source: str) -> None:
    assert violations(ROOT / relative, source) != []


@pytest.mark.parametrize(
    ("relative", "source"),
    [
        ("billing/x.py", "from db.models import BillingAccount"),
        ("graph/x.py", "from billing.settings import Settings"),
        ("cli/x.py", "from graph.schema import schema"),
        ("cli/x.py", "from stripe_sandbox.engine import DAY"),
        ("graph/app.py", "def f():\n    from stripe_sandbox.app import Sandbox"),
        ("graph/app.py", "async def f():\n    import stripe_sandbox.app"),
        ("graph/app.py", "if TYPE_CHECKING:\n    from stripe_sandbox.api import SandboxConfig"),
        ("stripe_sandbox/x.py", "from stripe_sandbox.store import y"),
        ("stripe_sandbox/x.py", "import stripe"),
    ],
)
def test_the_checker_allows_the_intended_direction(relative: str, source: str) -> None:
    assert violations(ROOT / relative, source) == []


MAX_MODULE_LINES = 800  # outside the emulator; most modules stay under 500


def test_no_project_module_is_over_800_lines() -> None:
    sizes = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for package in PROJECT
        for path in (ROOT / package).rglob("*.py")
    }
    assert {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}


def defines_tests(source: str) -> bool:
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
        for node in ast.walk(ast.parse(source))
    )


def test_test_modules_hold_tests_and_import_no_other_test_module() -> None:
    problems = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        source = path.read_text()
        if path.name.startswith("test_") and not defines_tests(source):
            problems.append(f"{path.name} holds no test: name it for what it helps with")
        problems.extend(
            f"{path.name}:{imported.line} imports {imported.module}: move what it shares to a helper module"
            for imported in imports_of(source)
            if imported.module.startswith("tests.test_")
        )
    assert problems == []
