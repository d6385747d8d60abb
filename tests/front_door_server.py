"""`scripts/dev` as a newcomer runs it: `billing migrate` then `billing serve` on a loopback
port, in development, in sandbox mode (no Stripe key), on SQLite. APP_URL is the service itself,
so the checkout page's redirect after paying stays on the same origin."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.processes import BILLING, wait_ready

SANDBOX_KEY = {"Authorization": "Bearer sk_test_front_door"}


@contextmanager
def dev_service(cwd: Path, **env: str) -> Iterator[str]:
    """The service's URL, once it is ready and its sandbox has the plans' prices."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    values = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{cwd / 'billing.db'}",
        "PUBLIC_BASE_URL": url,
        "APP_URL": url,
        **env,
    }
    environment = {key: value for key, value in os.environ.items() if key != "STRIPE_SECRET_KEY"}
    environment.update(values)
    migrated = subprocess.run([BILLING, "migrate"], env=environment, cwd=cwd, capture_output=True, text=True)
    assert migrated.returncode == 0, migrated.stderr
    log = cwd / f"billing-serve-{port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [BILLING, "serve", "--port", str(port)],
            env=environment,
            cwd=cwd,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(url, process, log)
        wait_for_prices(url)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def wait_for_prices(url: str, seconds: float = 30) -> None:
    """Until the service's start-up catalog sync has put the plans' prices into its sandbox."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        prices = httpx.get(f"{url}/sandbox/v1/prices", params={"limit": 100}, headers=SANDBOX_KEY, timeout=5)
        if prices.status_code == 200 and len(prices.json()["data"]) >= 4:
            return
        time.sleep(0.2)
    raise AssertionError(f"the sandbox at {url} never got the plans' prices")
