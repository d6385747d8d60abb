"""`schema.graphql` is the exported SDL: `billing schema --check` keeps it in step with the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BILLING = str(Path(sys.executable).with_name("billing"))
COMMITTED = ROOT / "schema.graphql"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING, *args], cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=60
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_the_committed_schema_matches_the_code() -> None:
    result = run("schema", "--check")
    assert result.returncode == 0, result.stderr
    assert "matches" in result.stdout


def test_billing_schema_prints_the_committed_sdl() -> None:
    result = run("schema")
    assert result.returncode == 0, result.stderr
    assert result.stdout == COMMITTED.read_text(encoding="utf-8")
    for name in ("type BillingSubscription", "enum SubscriptionStatus", "access(feature: String!)"):
        assert name in result.stdout


def test_a_modified_copy_fails_the_check_with_a_clear_message(tmp_path: Path) -> None:
    copy = tmp_path / "schema.graphql"
    copy.write_text(
        COMMITTED.read_text(encoding="utf-8").replace("  hasAccess: Boolean!\n", ""), encoding="utf-8"
    )
    result = run("schema", "--check", "--file", str(copy), cwd=tmp_path)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert str(copy) in line and "billing schema >" in line
    assert "+  hasAccess: Boolean!" in result.stderr  # the diff shows what the file lacks
    assert "Traceback" not in result.stderr


def test_a_missing_file_fails_the_check(tmp_path: Path) -> None:
    result = run("schema", "--check", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert "schema.graphql" in line
