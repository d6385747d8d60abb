"""`billing` run as a user runs it: separate processes on loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

BILLING = str(Path(sys.executable).with_name("billing"))


@contextmanager
def billing_serve(env: dict[str, str], cwd: Path, *, count: int = 1) -> Iterator[list[str]]:
    """`billing serve` processes on free ports (each with its PUBLIC_BASE_URL); yields their URLs.

    They start one after the other: the first creates the sandbox's tables. The database must be
    migrated already.
    """
    urls: list[str] = []
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for n in range(count):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = cwd / f"billing-serve-{port}-{n}.log"
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(
                        [BILLING, "serve", "--port", str(port)],
                        env={**os.environ, **env, "PUBLIC_BASE_URL": url},
                        cwd=cwd,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                )
            wait_ready(url, processes[-1], log)
            urls.append(url)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=15)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until `url` answers /readyz; fails with the process's output if it exits or takes 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    state = "did not come up in 30 s" if process.poll() is None else f"exited with {process.returncode}"
    pytest.fail(f"billing serve at {url} {state}; its output:\n{log.read_text(errors='replace')[-4000:]}")


def run(  # the `billing` command, to completion
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING, *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0]
