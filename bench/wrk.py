"""Run wrk (installing Debian's package when it is missing) and read its report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).resolve().parent / "lua"
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def ensure_wrk() -> str:
    """wrk's version line; installs it with apt-get when it is not on the PATH."""
    if shutil.which("wrk") is None:
        print("==> installing wrk (apt-get install -y wrk)", flush=True)
        apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "apt-get"]
        installed = subprocess.run([*apt, "install", "-y", "wrk"], capture_output=True, text=True)
        if installed.returncode != 0:
            subprocess.run([*apt, "update"], capture_output=True, check=False)
            subprocess.run([*apt, "install", "-y", "wrk"], capture_output=True, check=True)
    version = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    line = (version.stdout + version.stderr).strip().splitlines()[0]  # "wrk debian/4.1.0-3+b2 [epoll] ..."
    found = re.search(r"(\d+\.\d+[^\s\]]*)", line)
    return found.group(1) if found else line


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    output: str

    @property
    def clean(self) -> bool:
        return self.non_2xx == 0 and self.socket_errors == 0 and self.requests > 0


def _ms(value: str, unit: str) -> float:
    return float(value) * UNITS[unit]


def parse(output: str) -> WrkResult:
    def latency(percent: str) -> float:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        return _ms(*found.groups()) if found else float("nan")

    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests=int(done.group(1)) if done else 0,
        seconds=_ms(done.group(2), done.group(3)) / 1000 if done else 0.0,
        rps=float(rps.group(1)) if rps else 0.0,
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        output=output,
    )


def run(
    url: str,
    script: str,
    args: list[str] | None = None,
    *,
    connections: int,
    seconds: float,
    env: dict[str, str] | None = None,
) -> WrkResult:
    """`wrk -t min(2, c) -c c -d seconds --latency -s bench/lua/<script> url -- args`."""
    threads = min(2, connections)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(LUA / script),
        url,
    ]
    if args:
        command += ["--", *args]
    finished = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=seconds + 600
    )
    if finished.returncode != 0:
        raise RuntimeError(f"wrk failed ({finished.returncode}): {finished.stderr.strip()}")
    return parse(finished.stdout)
