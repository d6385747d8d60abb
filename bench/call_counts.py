"""Python function calls per request: a figure that does not move with the machine's load.

    .venv/bin/python bench/call_counts.py TREE [TREE ...] [--env KEY=VALUE[,KEY=VALUE] ...]

One throw-away PostgreSQL database, migrated and seeded by this tree's code (an account with an
active Pro subscription, one with 100k `api_calls` records and their rollups); then, for each
tree (with its `--env` settings, in order), a subprocess with that tree first on `sys.path` builds
its app in process behind httpx's `ASGITransport` (no server; a Stripe key is set so no sandbox
runs, no background worker), warms up with 50 requests and counts with cProfile the function
calls of the next 200: the viewer query of scenario 1, the `viewer.usage` query of scenario 5
and its quota fields alone.
The count includes httpx's own calls, the same for every tree; compare trees, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

WARM_UP = 50
COUNTED = 200
QUERIES = {
    "viewer query (scenario 1)": ("calls_user_0", "{ viewer { subscription { status tier } } }"),
    "viewer.usage, 100k records (scenario 5)": (
        "calls_usage_0",
        '{ viewer { usage(feature: "api_calls") { used limit daily { date quantity } } } }',
    ),
    "viewer.usage quota fields, 100k records (issue 23)": (
        "calls_usage_0",
        '{ viewer { usage(feature: "api_calls") { used limit remaining } } }',
    ),
}
BASE_ENV = {
    "STRIPE_SECRET_KEY": "sk_test_call_counts",
    "STRIPE_API_BASE": "http://127.0.0.1:9",
    "WEBHOOK_WORKER": "false",
    "USAGE_REPORTER": "false",
    "LOG_LEVEL": "WARNING",
}


async def seed(url: str) -> None:
    import asyncpg

    from bench import seed as bench_seed
    from db.engine import Database
    from db.migrate import upgrade

    await asyncio.to_thread(upgrade, url)
    now = datetime.now(UTC)
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await bench_seed.add_accounts(conn, "calls_user_", 1, now)
        [usage_account] = await bench_seed.add_accounts(conn, "calls_usage_", 1, now)
    finally:
        await conn.close()
    database = Database.from_url(url)
    try:
        await bench_seed.add_usage(database, usage_account, 0, 100_000, now)
    finally:
        await database.dispose()


async def measure() -> dict[str, float]:
    """In the subprocess: this tree's app, its calls per request for each query."""
    import httpx

    from billing.settings import load_settings
    from graph.app import create_app
    from graph.auth import issue_dev_token

    settings = load_settings()
    app = create_app(settings)
    found: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for name, (user, query) in QUERIES.items():
                headers = {"Authorization": f"Bearer {issue_dev_token(settings, user)}"}

                async def one(
                    user: str = user, query: str = query, headers: dict[str, str] = headers
                ) -> None:
                    response = await client.post("/graphql", json={"query": query}, headers=headers)
                    assert response.status_code == 200 and "errors" not in response.json(), response.text

                for _ in range(WARM_UP):
                    await one()
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(COUNTED):
                    await one()
                profile.disable()
                found[name] = pstats.Stats(profile).total_calls / COUNTED  # type: ignore[attr-defined]
    return found


def run_tree(tree: Path, url: str, env: dict[str, str]) -> dict[str, float]:
    process_env = {**os.environ, **BASE_ENV, **env, "DATABASE_URL": url, "PYTHONPATH": str(tree)}
    answer = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure"],
        cwd=tree,
        env=process_env,
        capture_output=True,
        text=True,
        check=False,
    )
    if answer.returncode != 0:
        raise SystemExit(f"{tree}: {answer.stderr[-3000:]}")
    result: dict[str, float] = json.loads(answer.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="*", type=Path)
    parser.add_argument("--env", nargs="*", default=None, help="KEY=VALUE[,KEY=VALUE] per tree, '-' for none")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        print(json.dumps(asyncio.run(measure())))
        return
    trees = [tree.resolve() for tree in arguments.trees] or [Path.cwd()]
    given = arguments.env or ["-"] * len(trees)
    if len(given) != len(trees):
        raise SystemExit("--env: one setting per tree")
    settings = [dict(kv.split("=", 1) for kv in spec.split(",")) if spec != "-" else {} for spec in given]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import seed as bench_seed

    name = bench_seed.new_database_name()
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    asyncio.run(bench_seed.create_database(name))
    try:
        asyncio.run(seed(url))
        rows = [(tree, env, run_tree(tree, url, env)) for tree, env in zip(trees, settings, strict=True)]
    finally:
        asyncio.run(bench_seed.drop_database(name))
    headers = [f"`{tree}` {','.join(f'{k}={v}' for k, v in env.items())}".strip() for tree, env, _ in rows]
    print(f"| calls per request | {' | '.join(headers)} |")
    print(f"|---|{'---:|' * len(rows)}")
    for query in QUERIES:
        print(f"| {query} | {' | '.join(f'{found[query]:,.0f}' for _, _, found in rows)} |")


if __name__ == "__main__":
    main()
