"""promtool, from Debian's `prometheus` package: installed with apt-get when it is missing (as
bench/wrk.py installs wrk). Without systemd the package only installs; no server starts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def ensure_promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "apt-get"]
        command = [*apt, "install", "-y", "-qq", "prometheus"]
        if subprocess.run(command, capture_output=True, check=False).returncode != 0:
            subprocess.run([*apt, "update", "-qq"], capture_output=True, check=False)
            subprocess.run(command, capture_output=True, check=True)
        found = shutil.which("promtool")
    assert found is not None, "promtool is not on the PATH after installing Debian's prometheus package"
    return found


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    """Run promtool; fails the test with its output when it does not exit 0."""
    done = subprocess.run(
        [ensure_promtool(), *args], input=stdin, capture_output=True, cwd=cwd, check=False, timeout=60
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0:
        pytest.fail(f"promtool {' '.join(args)} exited {done.returncode}:\n{output}")
    return output
