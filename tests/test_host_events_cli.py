"""`billing host-events list [--failed]` and `replay ID|--failed [--dry-run]`, run as a user runs them."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from sqlalchemy import select

from billing.clock import utcnow
from billing.host_events.delivery import DeliveryConfig, HostEventDelivery
from billing.host_events.events import PendingHostEvent, insert_events
from db.engine import Database
from db.models import host_event_table
from tests.host_receiver import SECRET, run_host_receiver

BILLING = str(Path(sys.executable).with_name("billing"))


async def billing(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop (the receiver answers from this loop)."""
    process = await asyncio.create_subprocess_exec(
        BILLING,
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def statuses(db: Database) -> list[str]:
    async with db.read() as conn:
        return list((await conn.execute(select(host_event_table.c.status))).scalars())


async def test_list_failed_then_replay_with_and_without_dry_run(db: Database, sqlite_url: str) -> None:
    async with db.write() as conn:
        await conn.execute(host_event_table.delete())
        await insert_events(
            conn,
            db,
            [PendingHostEvent("payment.failed", {"userId": "cli-user"})],
            account_id=1,
            user_id="cli-user",
            now=utcnow(),
        )
    async with run_host_receiver(SECRET, respond=500) as receiver:
        env = {
            "DATABASE_URL": sqlite_url,
            "HOST_WEBHOOK_URL": receiver.url,
            "HOST_WEBHOOK_SECRET": SECRET,
        }
        worker = HostEventDelivery(
            database=db, config=DeliveryConfig(url=receiver.url, secrets=[SECRET], delays=[0.01])
        )
        deadline = time.monotonic() + 10
        try:
            while await statuses(db) != ["failed"]:
                assert time.monotonic() < deadline
                await worker.drain()
                await asyncio.sleep(0.02)
        finally:
            await worker.close()
        assert len(receiver.deliveries) == 2

        code, out, err = await billing("host-events", "list", "--failed", env=env)
        assert code == 0, err
        [line] = out.splitlines()
        assert "payment.failed" in line and "\tfailed\t" in line and "last=500" in line and "cli-user" in line
        assert "HTTP 500" in line
        assert f"endpoint {receiver.url} enabled" in err

        code, out, err = await billing("host-events", "replay", "--failed", "--dry-run", env=env)
        assert code == 0, err
        assert "1 event(s) would be replayed" in out
        assert await statuses(db) == ["failed"] and len(receiver.deliveries) == 2

        receiver.respond = 200
        code, out, err = await billing("host-events", "replay", "--failed", env=env)
        assert code == 0, err
        assert "1 event(s) replayed: 1 delivered" in out
        assert await statuses(db) == ["delivered"]
        assert [d.status for d in receiver.deliveries] == [500, 500, 200]
        assert len({d.message_id for d in receiver.deliveries}) == 1

        code, out, err = await billing("host-events", "list", env=env)
        assert code == 0 and "\tdelivered\t" in out
        code, out, err = await billing("host-events", "list", "--failed", env=env)
        assert code == 0 and out == ""

        code, _out, err = await billing("host-events", "replay", "msg_nope", env=env)
        assert code == 1 and "no host event msg_nope" in err
        code, _out, err = await billing("host-events", "replay", env=env)
        assert code == 2 and "--failed" in err


async def test_replay_without_a_host_webhook_url_is_one_clear_line(sqlite_url: str) -> None:
    code, _out, err = await billing("host-events", "replay", "--failed", env={"DATABASE_URL": sqlite_url})
    assert code == 1 and "HOST_WEBHOOK_URL is not set" in err and "Traceback" not in err
