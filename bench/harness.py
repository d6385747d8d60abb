"""The benchmark run behind `bench/run` (issue 12): baselines and scenarios 1-6 on PostgreSQL.

    bench/run                 # full run, about 4 minutes; writes bench/RESULTS.md
    bench/run --quick         # smoke run: 2 s runs, small sizes; writes bench/RESULTS-quick.md

One throw-away PostgreSQL database (`bench_<hex>` on 127.0.0.1:5432) is created, migrated and
seeded, and dropped at the end. The servers (baselines, the service, the example host app for the
tier-gated field) run as `uvicorn ... --workers 1 --loop uvloop --http httptools --no-access-log
--log-level warning` on free ports, each in its own process group, stopped at the end (also on
Ctrl-C and on failure). Load comes from wrk over loopback with the Lua scripts of bench/lua.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import seed, wrk
from tests.stripe_events import sign

ROOT = Path(__file__).resolve().parent.parent
SERVER_FLAGS = [
    "--host",
    "127.0.0.1",
    "--workers",
    "1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
]
AB_CASES = {"viewer": "viewer", "viewer.usage": "usage", "webhook.lua": "webhook", "usage.lua": "record"}
VIEWER = "{ viewer { subscription { status tier } } }"
VIEWER_GATED = "{ viewer { subscription { status tier } } forecast { months } }"
USAGE = (
    '{ viewer { usage(feature: "api_calls") { used limit remaining windowStart windowEnd '
    "daily { date quantity } } } }"
)
USAGE_QUOTA = '{ viewer { usage(feature: "api_calls") { used limit remaining } } }'
USERS = 200  # seeded Pro users the JWTs and usage records cycle through
HOOK_CUSTOMERS = 20  # sandbox customers with a subscription, for the webhook events


@dataclass(frozen=True)
class Profile:
    seconds: float
    usage_sizes: tuple[int, ...]
    placed: int  # records of the account with issue 23's placements (bench/seed.py add_placed_usage)
    memory_requests: tuple[int, int]
    storm_events: int
    drain_timeout: float


FULL = Profile(8, (10_000, 100_000, 1_000_000), seed.PLACED, (1_000, 100_000), 300, 240)
QUICK = Profile(2, (1_000, 10_000), 10_000, (1_000, 5_000), 30, 60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"{self.name}: no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (robust to a busy machine)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


@dataclass
class Row:
    scenario: str
    what: str
    result: wrk.WrkResult | None
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    load: str = field(default_factory=load)
    note: str = ""
    cpu_ms: float | None = None  # the server's CPU time per request


class Bench:
    def __init__(self, profile: Profile, workdir: Path) -> None:
        self.profile = profile
        self.workdir = workdir
        self.servers: list[Server] = []
        self.database_name = seed.new_database_name()
        self.dsn = f"postgresql://postgres@127.0.0.1:5432/{self.database_name}"
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.database_name}"
        self.rows: list[Row] = []
        self.facts: dict[str, str] = {}
        self.secret = f"whsec_bench_{secrets.token_hex(16)}"
        self.service_key = f"sk_bench_{secrets.token_hex(16)}"
        self.env = {
            "ENVIRONMENT": "development",
            "DATABASE_URL": self.url,
            "AUTH_JWT_SECRET": secrets.token_hex(32),
            "SERVICE_API_KEY": self.service_key,
            "STRIPE_WEBHOOK_SECRET": self.secret,
            "LOG_LEVEL": "WARNING",
            "USAGE_REPORTER": "false",  # seeded customers are not in the sandbox; nothing to report
            "RATE_LIMIT_STRIPE_MUTATIONS": "off",
            "BENCH_PG_DSN": self.dsn,
            "BENCH_WEBHOOK_SECRET": self.secret,
        }
        for key in ("STRIPE_SECRET_KEY", "STRIPE_API_BASE", "AUTH_JWKS_URL", "SANDBOX_DATABASE_URL"):
            os.environ.pop(key, None)
        os.environ.update(self.env)

    # Servers ---------------------------------------------------------------------------------

    def start(
        self,
        name: str,
        target: str,
        *,
        factory: bool,
        ready: str,
        cwd: Path = ROOT,
        settings: dict[str, str] | None = None,
    ) -> Server:
        port = free_port()
        log = self.workdir / f"{name}.log"
        command = [sys.executable, "-m", "uvicorn", target, *(["--factory"] if factory else [])]
        command += [*SERVER_FLAGS, "--port", str(port)]
        env = {**os.environ, **(settings or {}), "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"}
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = Server(name, process, f"http://127.0.0.1:{port}", log)
        self.servers.append(server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + ready, timeout=2).status_code == 200:
                    return server
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not answer {ready} within 60 s")

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    # Helpers ---------------------------------------------------------------------------------

    def file(self, name: str, content: str) -> str:
        path = self.workdir / name
        path.write_text(content)
        return str(path)

    def graphql_body(self, query: str) -> str:
        return self.file(f"query-{abs(hash(query))}.json", json.dumps({"query": query}))

    def check_graphql(self, server: Server, query: str, token: str) -> dict[str, Any]:
        """One request by hand before the load: it must answer data and no errors."""
        response = httpx.post(
            f"{server.url}/graphql",
            json={"query": query},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        body: dict[str, Any] = response.json()
        if response.status_code != 200 or body.get("errors"):
            raise RuntimeError(f"{server.name}: {query} answered {response.status_code} {body}")
        return body

    def measure(
        self,
        scenario: str,
        what: str,
        server: Server,
        path: str,
        script: str,
        args: list[str],
        connections: int,
        **kw: Any,
    ) -> Row:
        print(f"--> {scenario}: {what} (c={connections})", flush=True)
        cpu = server.cpu_seconds()
        result = wrk.run(
            server.url + path, script, args, connections=connections, seconds=self.profile.seconds, **kw
        )
        row = Row(scenario, what, result)
        row.cpu_ms = (server.cpu_seconds() - cpu) * 1000 / max(result.requests, 1)
        if not result.clean:
            row.note = f"{result.non_2xx} non-2xx, {result.socket_errors} socket errors"
        print(
            f"    {result.rps:,.0f} req/s  p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  "
            f"server CPU {row.cpu_ms:.3f} ms/request  "
            f"load {row.load} {row.note}",
            flush=True,
        )
        self.rows.append(row)
        return row

    @staticmethod
    def compare(row: Row, baseline: Row, ratio: float, target: str, met: bool) -> None:
        row.baseline, row.ratio, row.target, row.met = baseline.what, ratio, target, met

    # The run ---------------------------------------------------------------------------------

    async def prepare(self) -> None:
        print(f"==> database {self.database_name}: create, migrate, seed", flush=True)
        await seed.create_database(self.database_name)
        await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).parent / "billing"), "migrate"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        from billing.settings import load_settings
        from db.engine import Database
        from graph.auth import issue_dev_token

        settings = load_settings()
        now = datetime.now(UTC)
        conn = await asyncpg.connect(self.dsn)
        try:
            self.account_ids = await seed.add_accounts(conn, "bench_user_", USERS, now)
            sizes = self.profile.usage_sizes
            self.usage_accounts = await seed.add_accounts(conn, "bench_usage_", len(sizes), now)
            [placed] = await seed.add_accounts(conn, "bench_placed_", 1, now)
        finally:
            await conn.close()
        database = Database.from_url(self.url)
        try:
            for account, size in zip(self.usage_accounts, sizes, strict=True):
                started = time.perf_counter()
                await seed.add_usage(database, account, 0, size, now)
                print(f"    {size:,} usage records in {time.perf_counter() - started:.1f} s", flush=True)
            started = time.perf_counter()
            await seed.add_placed_usage(database, placed, now, self.profile.placed)
            print(
                f"    {self.profile.placed:,} placed records in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
        finally:
            await database.dispose()
        ttl = timedelta(hours=2)
        self.tokens = [issue_dev_token(settings, f"bench_user_{n}", ttl=ttl) for n in range(USERS)]
        self.tokens_file = self.file("tokens.txt", "\n".join(self.tokens) + "\n")
        self.usage_tokens = [
            issue_dev_token(settings, f"bench_usage_{n}", ttl=ttl) for n in range(len(sizes))
        ]
        self.placed_jwt = issue_dev_token(settings, "bench_placed_0", ttl=ttl)
        self.placed_token = self.file("placed-token.txt", self.placed_jwt + "\n")
        self.facts["env"] = "USAGE_REPORTER=false, RATE_LIMIT_STRIPE_MUTATIONS=off, LOG_LEVEL=WARNING"

    def baselines(self) -> None:
        server = self.start("baselines", "bench.baselines:app", factory=False, ready="/b0")
        self.b0 = self.measure("B0", "B0 Starlette JSON", server, "/b0", "get.lua", [], 32)
        self.b1 = self.measure("B1", "B1 Starlette + asyncpg fetchrow", server, "/b1", "get.lua", [], 32)
        self.b1_1 = self.measure("B1", "B1 at 1 connection", server, "/b1", "get.lua", [], 1)
        self.baseline_server = server

    def scenario_1_2(self, service: Server) -> None:
        self.check_graphql(service, VIEWER, self.tokens[0])
        body = self.graphql_body(VIEWER)
        s1 = self.measure(
            "1",
            "viewer { subscription { status tier } }",
            service,
            "/graphql",
            "post.lua",
            [body, self.tokens_file],
            32,
        )
        ratio = s1.result.rps / self.b1.result.rps if s1.result and self.b1.result else 0.0
        if s1.cpu_ms and self.b1.cpu_ms:
            s1.note = (s1.note + f" server CPU per request {s1.cpu_ms / self.b1.cpu_ms:.1f} x B1's").strip()
        self.compare(s1, self.b1, ratio, "≥ 0.40 x B1", ratio >= 0.40)
        s1_1 = self.measure(
            "1",
            "the same at 1 connection (p50)",
            service,
            "/graphql",
            "post.lua",
            [body, self.tokens_file],
            1,
        )
        assert s1_1.result and self.b1_1.result
        above = s1_1.result.p50_ms - self.b1_1.result.p50_ms
        self.compare(s1_1, self.b1_1, above, "p50 ≤ B1's + 1 ms", above <= 1.0)
        s1_1.note = (s1_1.note + f" p50 {above:+.2f} ms vs B1").strip()
        self.s1 = s1
        host = self.start("host-app", "examples.host_app.app:create_host_app", factory=True, ready="/healthz")
        self.check_graphql(host, VIEWER_GATED, self.tokens[0])
        plain = self.measure(
            "2",
            "host app: viewer query (scenario 1 on the host app)",
            host,
            "/graphql",
            "post.lua",
            [body, self.tokens_file],
            32,
        )
        gated = self.measure(
            "2",
            "host app: + forecast (RequiresTier(PRO))",
            host,
            "/graphql",
            "post.lua",
            [self.graphql_body(VIEWER_GATED), self.tokens_file],
            32,
        )
        assert plain.result and gated.result
        ratio = gated.result.rps / plain.result.rps
        if gated.cpu_ms and plain.cpu_ms:
            gated.note = (
                gated.note + f" server CPU per request: {plain.cpu_ms / gated.cpu_ms:.2f} x the plain query's"
            ).strip()
        self.compare(gated, plain, ratio, "≥ 0.95 x scenario 1", ratio >= 0.95)
        host.stop()
        self.servers.remove(host)

    async def sandbox_customers(self, service: Server) -> list[dict[str, Any]]:
        """Customers with a paid subscription in the service's sandbox; their subscriptions."""
        from billing.settings import load_settings
        from billing.stripe_gateway import GatewayConfig, StripeGateway

        os.environ["PUBLIC_BASE_URL"] = service.url
        gateway = StripeGateway(GatewayConfig.from_settings(load_settings()))
        subscriptions = []
        try:
            prices: dict[str, str] = {}
            for _ in range(100):
                listed = await gateway.v1.prices.list_async({"active": True, "limit": 100})
                prices = {p.lookup_key: p.id for p in listed.data if p.lookup_key}
                if "pro_monthly" in prices:
                    break
                await asyncio.sleep(0.2)
            async with httpx.AsyncClient(timeout=30) as client:
                for n in range(HOOK_CUSTOMERS):
                    user = f"bench_hook_{n}"
                    customer = await gateway.v1.customers.create_async(
                        {"email": f"{user}@example.test", "metadata": {"userId": user}}
                    )
                    session = await gateway.v1.checkout.sessions.create_async(
                        {
                            "mode": "subscription",
                            "customer": customer.id,
                            "client_reference_id": user,
                            "line_items": [{"price": prices["pro_monthly"], "quantity": 1}],
                            "subscription_data": {"metadata": {"userId": user}},
                            "success_url": "http://app.test/billing/success",
                            "cancel_url": "http://app.test/pricing",
                        }
                    )
                    done = await client.post(
                        f"{service.url}/sandbox/_control/checkout/{session.id}/complete",
                        json={"outcome": "paid"},
                    )
                    done.raise_for_status()
                    session = await gateway.v1.checkout.sessions.retrieve_async(session.id)
                    subscription = await gateway.v1.subscriptions.retrieve_async(str(session.subscription))
                    subscriptions.append(subscription.to_dict())
        finally:
            await gateway.close()
        return subscriptions

    def event_files(self, tag: str, count: int) -> tuple[str, str, list[str]]:
        """Templates (one per sandbox subscription) and `count` distinct signed events."""
        now = int(time.time())
        templates = []
        for subscription in self.subscriptions:
            event = {
                "id": "@@EVT@@",
                "object": "event",
                "api_version": "2026-10-28.endive",
                "created": now,
                "data": {"object": subscription, "previous_attributes": {"metadata": {}}},
                "livemode": False,
                "pending_webhooks": 1,
                "request": {"id": None, "idempotency_key": None},
                "type": "customer.subscription.updated",
            }
            templates.append(json.dumps(event, separators=(",", ":"), default=str))
        self.facts["event body"] = (
            f"{len(templates[0]):,} bytes (a sandbox subscription, `customer.subscription.updated`)"
        )
        nonce = secrets.token_hex(3)
        lines, ids = [], []
        for n in range(count):
            index = n % len(templates)
            event_id = f"evt_{tag}_{nonce}_{n:07d}"
            body = templates[index].replace("@@EVT@@", event_id).encode()
            lines.append(f"{index}\t{event_id}\t{sign(body, self.secret, now)}")
            ids.append(event_id)
        return (
            self.file(f"{tag}-templates.txt", "\n".join(templates) + "\n"),
            self.file(f"{tag}-events.txt", "\n".join(lines) + "\n"),
            ids,
        )

    async def scenario_3(self, service: Server) -> None:
        self.subscriptions = await self.sandbox_customers(service)
        await self.drain(service, [], 60)  # the sandbox's own events of the set-up
        count = int(12_000 * self.profile.seconds)  # more than either can take in one run
        templates, events, _ = self.event_files("b2", count)
        b2 = self.measure(
            "B2",
            "B2 Starlette + HMAC + INSERT ON CONFLICT",
            self.baseline_server,
            "/b2",
            "webhook.lua",
            [templates, events, "2"],
            32,
        )
        # The acknowledgement path alone: a service process whose worker is off, as when the
        # workers run in processes of their own. With the worker in the same process, applying
        # the backlog (and the in-process sandbox answering its Stripe calls, work that real
        # Stripe does elsewhere) shares the CPU with the ingest: the row after this one.
        ack = self.start(
            "service-ack",
            "graph.app:create_app",
            factory=True,
            ready="/healthz",
            settings={"WEBHOOK_WORKER": "false"},
        )
        templates, events, ids = self.event_files("s3", count)
        s3 = self.measure(
            "3",
            "webhook ingest (acknowledgement; no worker in the process)",
            ack,
            "/webhooks/stripe",
            "webhook.lua",
            [templates, events, "2"],
            32,
        )
        ended = time.monotonic()
        ack.stop()
        self.servers.remove(ack)
        assert s3.result and b2.result
        if s3.result.requests > count:
            s3.note += f" {s3.result.requests - count} duplicates (the event file wrapped)"
        ratio = s3.result.rps / b2.result.rps
        self.compare(s3, b2, ratio, "≥ 0.6 x B2", ratio >= 0.6)  # issue 23 (0.5 in round 1)
        sent = ids[: min(count, s3.result.requests + 64)]
        conn = await asyncpg.connect(self.dsn)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM stripe_event WHERE id = ANY($1::text[])", sent)
            backlog = await conn.fetchval(
                "SELECT count(*) FROM stripe_event WHERE id = ANY($1::text[]) "
                "AND status IN ('pending', 'processing')",
                sent,
            )
        finally:
            await conn.close()
        drained = await self.drain(service, sent, self.profile.drain_timeout)
        finished = time.monotonic()
        rate = (stored - drained.pending) / (finished - ended)  # the worker starts once ingest ends
        self.facts["scenario 3 worker"] = (
            f"{stored:,} events stored; backlog at the end of the run {backlog:,}; "
            + (
                f"inbox empty {finished - ended:.1f} s after the run"
                if drained.pending == 0
                else f"{drained.pending:,} still pending {finished - ended:.1f} s after the run"
            )
            + f"; one process's worker applied {rate:,.0f} events/s; statuses {drained.statuses}"
        )
        print(f"    worker: {self.facts['scenario 3 worker']}", flush=True)
        templates, events, shared_ids = self.event_files("s3shared", count)
        shared = self.measure(
            "3",
            "webhook ingest, the worker applying in the same process",
            service,
            "/webhooks/stripe",
            "webhook.lua",
            [templates, events, "2"],
            32,
        )
        assert shared.result
        ratio_shared = shared.result.rps / b2.result.rps
        shared.note = f"{ratio_shared:.2f} x B2 (information, no target) {shared.note}".strip()
        await self.drain(service, shared_ids[: shared.result.requests + 64], self.profile.drain_timeout)
        await self.duplicate_storm(service)

    async def drain(self, service: Server, ids: list[str], seconds: float) -> seed.InboxEffects:
        deadline = time.monotonic() + seconds
        conn = await asyncpg.connect(self.dsn)
        try:
            while True:
                if ids:
                    effects = await seed.inbox_effects(conn, ids)
                    pending = effects.pending
                else:
                    effects = seed.InboxEffects(0, 0, 0, 0, {})
                    pending = await conn.fetchval(
                        "SELECT count(*) FROM stripe_event WHERE status IN ('pending', 'processing')"
                    )
                if pending == 0 or time.monotonic() > deadline:
                    return effects
                await asyncio.sleep(0.25)
        finally:
            await conn.close()

    async def duplicate_storm(self, service: Server) -> None:
        count = self.profile.storm_events
        templates_file, events_file, ids = self.event_files("storm", count)
        templates = Path(templates_file).read_text().splitlines()  # noqa: ASYNC240 (small, local)
        requests = []
        for line in Path(events_file).read_text().splitlines():  # noqa: ASYNC240
            index, event_id, signature = line.split("\t")
            body = templates[int(index)].replace("@@EVT@@", event_id).encode()
            requests.extend([(event_id, body, signature)] * 10)
        random.shuffle(requests)
        fresh: dict[str, int] = dict.fromkeys(ids, 0)
        failures = 0
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:

            async def post(event_id: str, body: bytes, signature: str) -> None:
                nonlocal failures
                async with limit:
                    response = await client.post(
                        "/webhooks/stripe",
                        content=body,
                        headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
                    )
                if response.status_code != 200:
                    failures += 1
                elif not response.json()["duplicate"]:
                    fresh[event_id] += 1

            await asyncio.gather(*(post(*request) for request in requests))
        effects = await self.drain(service, ids, self.profile.drain_timeout)
        acknowledged_new_once = sum(1 for n in fresh.values() if n == 1)
        ok = effects.exactly_once and acknowledged_new_once == count and failures == 0
        self.facts["scenario 3 duplicate storm"] = (
            f"{count} events x 10 copies, shuffled, 32 at a time: {failures} failed requests; "
            f"{acknowledged_new_once}/{count} events answered `duplicate: false` exactly once; "
            f"inbox rows {effects.rows}/{count}, "
            f"applied in exactly one attempt {effects.applied_once}/{count} "
            f"({effects.statuses}): {'exactly one effect per event' if ok else 'NOT exactly once'}"
        )
        self.rows.append(
            Row(
                "3",
                "duplicate storm (10 copies of each event)",
                None,
                target="exactly one effect per event",
                met=ok,
                note=self.facts["scenario 3 duplicate storm"],
            )
        )
        print(f"    storm: {self.facts['scenario 3 duplicate storm']}", flush=True)

    async def scenario_4(self, service: Server) -> None:
        nonce = secrets.token_hex(4)
        for batch in (1, 100):
            tag = f"{nonce}b{batch}"
            args = [self.service_key, str(batch), "bench_user_", str(USERS), tag]
            what = "recordUsage" if batch == 1 else "recordUsageBatch of 100"
            row = self.measure("4", what, service, "/graphql", "usage.lua", args, 32 if batch == 1 else 8)
            assert row.result
            conn = await asyncpg.connect(self.dsn)
            try:
                rows = await conn.fetchval(
                    "SELECT count(*) FROM usage_record WHERE idempotency_key LIKE $1", f"{tag}-%"
                )
            finally:
                await conn.close()
            records = rows / row.result.seconds
            expected = row.result.requests * batch
            row.note = (
                row.note + f" {records:,.0f} records/s ({rows:,} rows stored for "
                f"{expected:,} records answered)"
            ).strip()
            if rows < expected:
                row.note += " MISSING ROWS"
            if batch == 1:
                row.target, row.met, row.ratio = "≥ 2,000 records/s", records >= 2000, None
            else:
                row.target = "report records/s"

    def scenario_5(self, service: Server) -> None:
        body = self.graphql_body(USAGE)
        p50s = []
        for n, size in enumerate(self.profile.usage_sizes):
            token = self.usage_tokens[n]
            answer = self.check_graphql(service, USAGE, token)["data"]["viewer"]["usage"]
            tokens = self.file(f"usage-token-{n}.txt", token + "\n")
            row = self.measure(
                "5", f"viewer.usage, {size:,} records", service, "/graphql", "post.lua", [body, tokens], 1
            )
            assert row.result
            row.note = (row.note + f" used {answer['used']:,} in the window").strip()
            row.target, row.met = "p50 ≤ 5 ms, flat", row.result.p50_ms <= 5.0
            p50s.append(row.result.p50_ms)
        spread = max(p50s) - min(p50s)
        self.facts["scenario 5"] = (
            f"p50 from {min(p50s):.2f} to {max(p50s):.2f} ms across the sizes (spread {spread:.2f} ms)"
        )
        # Issue 23: the quota fields at 32 connections, for users with little usage and for the
        # account whose records fall in the window's first partial hour, the current hour and late.
        quota = self.graphql_body(USAGE_QUOTA)
        few = self.measure(
            "5",
            "usage quota fields, few records, c=32",
            service,
            "/graphql",
            "post.lua",
            [quota, self.tokens_file],
            32,
        )
        answer = self.check_graphql(service, USAGE_QUOTA, self.placed_jwt)
        placed = self.measure(
            "5",
            f"usage quota fields, {self.profile.placed:,} placed records, c=32",
            service,
            "/graphql",
            "post.lua",
            [quota, self.placed_token],
            32,
        )
        for row in (few, placed):
            assert row.result and self.b1.result
            ratio = row.result.rps / self.b1.result.rps
            self.compare(row, self.b1, ratio, "≥ 0.40 x B1", ratio >= 0.40)
        assert few.result and placed.result
        kept = placed.result.rps / few.result.rps
        placed.note = (
            placed.note + f" used {answer['data']['viewer']['usage']['used']:,}; "
            f"{kept:.2f} x the few-records row (target ≥ 0.9)"
        ).strip()

    def scenario_6(self) -> None:
        service = self.start("service-memory", "graph.app:create_app", factory=True, ready="/healthz")
        body = self.graphql_body(VIEWER)
        first, total = self.profile.memory_requests
        print(f"--> 6: RSS of one fresh service process after {first:,} and {total:,} requests", flush=True)
        start_rss = service.rss_mib()
        done, rate = 0, 500.0
        readings = {}
        for target in (first, total):
            # wrk sleeps its whole -d: run in slices sized by the rate so far, each capped by BENCH_LIMIT.
            while done < target:
                seconds = min(30.0, max(1.0, (target - done) / rate * 1.1))
                limit = max(1, (target - done) // 2)
                result = wrk.run(
                    service.url + "/graphql",
                    "post.lua",
                    [body, self.tokens_file],
                    connections=32,
                    seconds=seconds,
                    env={"BENCH_LIMIT": str(limit)},
                )
                done += result.requests
                rate = max(50.0, result.requests / max(result.seconds, 0.1))
            readings[target] = (done, service.rss_mib())
        (n1, rss1), (n2, rss2) = readings[first], readings[total]
        ratio = rss2 / rss1
        row = Row(
            "6",
            f"RSS after {n1:,} → {n2:,} requests",
            None,
            target="≤ 1.2 x",
            ratio=ratio,
            met=ratio <= 1.2,
            note=f"{start_rss:.1f} MiB at start, {rss1:.1f} MiB after {n1:,}, {rss2:.1f} MiB after {n2:,}",
        )
        self.rows.append(row)
        print(f"    {row.note} (x {ratio:.3f})", flush=True)
        service.stop()
        self.servers.remove(service)

    async def run(self) -> None:
        await self.prepare()
        self.baselines()
        service = self.start("service", "graph.app:create_app", factory=True, ready="/healthz")
        self.scenario_1_2(service)
        await self.scenario_3(service)
        await self.scenario_4(service)
        self.scenario_5(service)
        service.stop()
        self.servers.remove(service)
        self.scenario_6()

    async def serve(self, target: str) -> None:
        """`--serve`: the seeded database and one server, with the wrk commands to load it, until Ctrl-C."""
        await self.prepare()
        server = self.start(
            "serve", target, factory=target.count(":") == 1 and "create" in target, ready="/healthz"
        )
        body = self.graphql_body(VIEWER)
        print(
            f"==> {target} (pid {server.pid}) at {server.url}; database {self.database_name}\n"
            f"wrk -t2 -c32 -d8s --latency -s bench/lua/post.lua {server.url}/graphql "
            f"-- {body} {self.tokens_file}\n"
            f".venv/bin/py-spy record -p {server.pid} -d 8 -f speedscope -o profile.json   # while wrk runs\n"
            "Ctrl-C to stop and drop the database.",
            flush=True,
        )
        usage_body = self.graphql_body(USAGE)
        for n, size in enumerate(self.profile.usage_sizes):
            tokens = self.file(f"usage-token-{n}.txt", self.usage_tokens[n] + "\n")
            print(f"viewer.usage, {size:,} records: -s bench/lua/post.lua ... -- {usage_body} {tokens}")
        print(f"recordUsage: -s bench/lua/usage.lua ... -- {self.service_key} 1 bench_user_ {USERS} NONCE")
        if "create_app" in target:
            self.subscriptions = await self.sandbox_customers(server)
            templates, events, _ = self.event_files("serve", 100_000)
            print(
                "webhooks (signed now, valid 5 minutes): "
                f"-s bench/lua/webhook.lua ... -- {templates} {events} 2"
            )
        Path(self.workdir.parent / "bench-serve.txt").write_text(  # noqa: ASYNC240
            f"{server.pid} {server.url} {body} {self.tokens_file} {self.service_key} {usage_body} {tokens}\n"
        )
        while server.process.poll() is None:  # noqa: ASYNC110 (polling a child process)
            await asyncio.sleep(1)

    async def compare_trees(
        self,
        trees: list[Path],
        settings: list[dict[str, str]] | None = None,
        rounds: int = 3,
        only: set[str] | None = None,
    ) -> str:
        """`--ab`: the same requests against the service of each source tree (with its settings of
        `--ab-env`, if any), in turns, on one database."""
        await self.prepare()
        settings = settings or [{} for _ in trees]
        services = [
            self.start(
                f"tree{n}", "graph.app:create_app", factory=True, ready="/healthz", cwd=tree, settings=env
            )
            for n, (tree, env) in enumerate(zip(trees, settings, strict=True))
        ]
        names = [
            f"{tree}{' ' + ' '.join(f'{k}={v}' for k, v in env.items()) if env else ''}"
            for tree, env in zip(trees, settings, strict=True)
        ]
        for service in services:
            self.check_graphql(service, VIEWER, self.tokens[0])
        self.subscriptions = await self.sandbox_customers(services[0])
        usage_token = self.file("ab-usage-token.txt", self.usage_tokens[-1] + "\n")
        cases = [
            ("viewer query, c=32", "post.lua", [self.graphql_body(VIEWER), self.tokens_file], 32),
            ("viewer.usage (largest size), c=1", "post.lua", [self.graphql_body(USAGE), usage_token], 1),
            (
                "viewer.usage quota fields (placed records), c=32",
                "post.lua",
                [self.graphql_body(USAGE_QUOTA), self.placed_token],
                32,
            ),
        ]
        rows: dict[tuple[str, int], list[Row]] = {}
        for n in range(rounds):
            all_cases = [
                *cases,
                ("webhook ingest, c=32", "webhook.lua", [], 32),
                (
                    "recordUsage, c=32",
                    "usage.lua",
                    [self.service_key, "1", "bench_user_", str(USERS), f"ab{n}"],
                    32,
                ),
            ]
            for what, script, args, connections in all_cases:
                if only and AB_CASES[script if script != "post.lua" else what.split()[0]] not in only:
                    continue
                for index, service in enumerate(services):
                    if script == "usage.lua":
                        args = [*args[:4], f"ab{n}t{index}"]
                    if script == "webhook.lua":
                        templates, events, _ = self.event_files(f"ab{n}t{index}", 60_000)
                        args = [templates, events, "2"]
                    path = "/webhooks/stripe" if script == "webhook.lua" else "/graphql"
                    what_here = f"{names[index]}: {what}"
                    row = self.measure("ab", what_here, service, path, script, args, connections)
                    rows.setdefault((what, index), []).append(row)
        lines = [
            f"A/B of {rounds} rounds, in turns, {self.profile.seconds:g} s runs; load {load()} at the end",
            "",
            "| case | tree | req/s (median) | p50 ms (median) | server CPU ms/req (median) |",
            "|---|---|---:|---:|---:|",
        ]
        for (what, index), measured in rows.items():
            rps = statistics.median(r.result.rps for r in measured if r.result)
            p50 = statistics.median(r.result.p50_ms for r in measured if r.result)
            cpu = statistics.median(r.cpu_ms for r in measured if r.cpu_ms is not None)
            lines.append(f"| {what} | `{names[index]}` | {rps:,.0f} | {p50:.2f} | {cpu:.3f} |")
        lines += ["", "Server CPU per request, each tree over the first, per round (median, range):", ""]
        for (what, index), measured in rows.items():
            if index == 0:
                continue
            first = rows[(what, 0)]
            ratios = sorted(
                b.cpu_ms / a.cpu_ms for a, b in zip(first, measured, strict=True) if a.cpu_ms and b.cpu_ms
            )
            if ratios:
                lines.append(
                    f"- {what}, `{names[index]}`: {statistics.median(ratios):.3f} "
                    f"({ratios[0]:.3f} to {ratios[-1]:.3f}, {len(ratios)} rounds)"
                )
        return "\n".join(lines) + "\n"

    async def cleanup(self) -> None:
        self.stop_all()
        with contextlib.suppress(Exception):
            await seed.drop_database(self.database_name)
            print(f"==> dropped database {self.database_name}", flush=True)


def ab_settings(given: list[str] | None, trees: int) -> list[dict[str, str]] | None:
    """`--ab-env`'s settings, one dict per tree."""
    if given is None:
        return None
    if len(given) != trees:
        raise SystemExit(f"--ab-env: {len(given)} settings for {trees} trees (one per tree, '-' for none)")
    settings = []
    for spec in given:
        pairs = [] if spec == "-" else [pair.split("=", 1) for pair in spec.split(",")]
        if any(len(pair) != 2 or not pair[0] for pair in pairs):
            raise SystemExit(f"--ab-env: {spec!r} is not KEY=VALUE[,KEY=VALUE] or -")
        settings.append({key: value for key, value in pairs})
    return settings


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "wrk": wrk.ensure_wrk()}
    for package in (
        "uvicorn",
        "uvloop",
        "httptools",
        "starlette",
        "fastapi",
        "strawberry-graphql",
        "graphql-core",
        "stripe",
        "asyncpg",
        "sqlalchemy",
        "sqlmodel",
    ):
        found[package] = version(package)
    pg = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SHOW server_version"],
        capture_output=True,
        text=True,
    )
    found["postgresql"] = pg.stdout.strip() or "?"
    return found


def cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def result_cells(result: wrk.WrkResult | None) -> str:
    if result is None:
        return " |  |  |"
    return f" {result.rps:,.0f} | {result.p50_ms:.2f} | {result.p99_ms:.2f} |"


def report(bench: Bench, found: dict[str, str], started: datetime, load_before: str, quick: bool) -> str:
    lines = [
        f"### Run of {started:%Y-%m-%d %H:%M} UTC{' (--quick)' if quick else ''}",
        "",
        f"`bench/run{' --quick' if quick else ''}` on {os.cpu_count()} CPUs; load average (1, 5, 15 min) "
        f"{load_before} before, {load()} after. "
        + ", ".join(f"{name} {value}" for name, value in found.items())
        + ".",
        f"Servers: uvicorn `{' '.join(SERVER_FLAGS)}`; load: wrk -t2 (-t1 at 1 connection), "
        f"{bench.profile.seconds:g} s per run. Service settings: {bench.facts.get('env', '')}.",
        "",
        "| scenario | what | req/s | p50 ms | p99 ms | server CPU ms/req | compared with | ratio | target "
        "| met | load | note |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---|---|---|",
    ]
    for row in bench.rows:
        r = row.result
        met = "" if row.met is None else ("met" if row.met else "**missed**")
        ratio = (
            ""
            if row.ratio is None
            else (f"{row.ratio:+.2f} ms" if "ms" in row.target else f"{row.ratio:.2f}")
        )
        lines.append(
            f"| {row.scenario} | {row.what} |{result_cells(r)} {cell(row.cpu_ms, '.3f')} | {row.baseline} "
            f"| {ratio} | {row.target} | {met} | {row.load} | {row.note} |"
        )
    lines.append("")
    for name, fact in bench.facts.items():
        if name != "env":
            lines.append(f"- {name}: {fact}")
    return "\n".join(lines) + "\n"


START, END = "<!-- bench:latest-run -->", "<!-- /bench:latest-run -->"


def write(path: Path, section: str) -> None:
    """Replace the latest-run section of `path`, keeping the rest (the history of fixes)."""
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{section}{END}{tail}")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run with KeyboardInterrupt, so the clean-up runs."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell without job control starts background commands with it ignored.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> None:
    try:
        _main()
    except KeyboardInterrupt as stop:
        print(f"==> interrupted ({stop or 'Ctrl-C'}); servers stopped, database dropped", file=sys.stderr)
        sys.exit(130)


def _main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs and small sizes (a smoke run)")
    parser.add_argument(
        "--ab",
        nargs="+",
        type=Path,
        default=None,
        metavar="TREE",
        help="compare the services of these source trees (e.g. git worktrees), in turns",
    )
    parser.add_argument(
        "--ab-env",
        nargs="+",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="with --ab: the service settings of each tree, in order ('-' for none), "
        "e.g. --ab . . --ab-env FAST_PATHS=true FAST_PATHS=false",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --ab: rounds of turns")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"with --ab: a comma-separated subset of {','.join(sorted(set(AB_CASES.values())))}",
    )
    parser.add_argument("--seconds", type=float, default=None, help="length of each wrk run")
    parser.add_argument(
        "--serve",
        metavar="APP",
        default=None,
        help="only seed and serve APP (e.g. graph.app:create_app) for profiling, until Ctrl-C",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="default bench/RESULTS.md (RESULTS-quick.md)"
    )
    arguments = parser.parse_args()
    profile = QUICK if arguments.quick else FULL
    if arguments.seconds:
        profile = dataclasses.replace(profile, seconds=arguments.seconds)
    output = arguments.output or ROOT / "bench" / ("RESULTS-quick.md" if arguments.quick else "RESULTS.md")
    found = versions()
    started, load_before = datetime.now(UTC), load()
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir, interruptible():
        bench = Bench(profile, Path(workdir))
        try:
            if arguments.ab:
                trees = [tree.resolve() for tree in arguments.ab]
                only = set(arguments.cases.split(",")) if arguments.cases else None
                compared = bench.compare_trees(
                    trees, ab_settings(arguments.ab_env, len(trees)), arguments.rounds, only
                )
                print(asyncio.run(compared))
            elif arguments.serve:
                asyncio.run(bench.serve(arguments.serve))
            else:
                asyncio.run(bench.run())
        finally:
            for server in bench.servers:
                if server.process.poll() is not None and server.process.returncode not in (0, -15):
                    print(f"{server.name} log:\n{server.log.read_text()[-3000:]}", file=sys.stderr)
            asyncio.run(bench.cleanup())
    if arguments.serve or arguments.ab:
        return
    section = report(bench, found, started, load_before, arguments.quick)
    write(output, section)
    print(section)
    print(f"==> written to {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
