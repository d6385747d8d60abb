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
        for _ in range(count):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            processes.append(
                subprocess.Popen(
                    [BILLING, "serve", "--port", str(port)],
                    env={**os.environ, **env, "PUBLIC_BASE_URL": url},
                    cwd=cwd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_ready(url)
            urls.append(url)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=15)


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"billing serve at {url} did not come up")
