"""Several bridges on one PostgreSQL against one bridge on SQLite (docs/storage.md).

The same load generator and the same reference AI server (no delay) for
both: first one bridge on a SQLite file; then two bridges on one PostgreSQL
database, each given half of the connections, over the same sessions (no
stickiness: any message of a session may reach either bridge). The pair's
throughput is the two runs' sum and its latency the worse of the two.

PostgreSQL is a throwaway server started here (Debian's postgresql package,
as the tests do) with its durable defaults (fsync, synchronous_commit on),
or the one ``SESSIONBRIDGE_BENCH_POSTGRES`` names (its user needs CREATEDB).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadgen import LoadResult, median_result, write_paths
from phases import Context, fresh_bridge, ready_sessions
from procs import Server, create_key

LEVELS = (2, 32)  # connections in all, split evenly over the pair
ENV_SERVER = "SESSIONBRIDGE_BENCH_POSTGRES"


@contextlib.contextmanager
def postgres_database(ctx: Context) -> Iterator[str]:
    """A fresh database's URL on a server of this run's own (or the one named)."""
    # The tests' throwaway server (tests/postgres.py), not a second copy of it.
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from tests.postgres import LocalServer, NoPostgres, _admin, with_database

    given = os.environ.get(ENV_SERVER)
    local = None
    if given:
        admin = given
    else:
        try:
            local = _start_durable(LocalServer)
        except NoPostgres as exc:
            raise RuntimeError(f"no PostgreSQL server for the several-bridges part: {exc}") from exc
        admin = local.dsn
    name = f"sessionbridge_bench_{uuid.uuid4().hex[:8]}"
    try:
        _admin(admin, f"CREATE DATABASE {name}")
        yield with_database(admin, name)
    finally:
        with contextlib.suppress(Exception):
            _admin(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if local is not None:
            local.stop()


def _start_durable(server_class: Any) -> Any:
    """The tests' throwaway server, restarted with PostgreSQL's durable defaults.

    The tests run it with fsync off; a benchmark against SQLite must not.
    """
    server = server_class.start()
    server.pause()
    options = (
        f"-p {server.port} -k {server.root} -c listen_addresses=127.0.0.1"
        " -c max_connections=200"
    )
    server._run(
        str(server.bindir / "pg_ctl"), "-D", str(server.data),
        "-l", str(server.root / "server.log"), "-o", options, "-w", "-t", "60", "start",
    )
    return server


async def _pair_run(
    ctx: Context, bridges: list[Server], paths: Any, token: str, connections: int, duration: float
) -> LoadResult:
    share = max(connections // len(bridges), 1)
    results = await asyncio.gather(*(
        ctx.load.run(bridge.url, paths, token, share, duration) for bridge in bridges
    ))
    first = results[0]
    return LoadResult(
        generator=first.generator,
        connections=share * len(bridges),
        requests=sum(r.requests for r in results),
        duration_s=max(r.duration_s for r in results),
        rps=sum(r.rps for r in results),
        p50_ms=max(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        mean_ms=max(r.mean_ms for r in results),
        max_ms=max(r.max_ms for r in results),
        http_errors=sum(r.http_errors for r in results),
        socket_errors=sum(r.socket_errors for r in results),
    )


async def _measure(
    ctx: Context, bridges: list[Server], paths: Any, token: str
) -> dict[str, Any]:
    plan = ctx.plan
    levels: dict[str, Any] = {}
    for connections in LEVELS:
        await _pair_run(ctx, bridges, paths, token, connections, plan.warmup)
        runs = [
            await _pair_run(ctx, bridges, paths, token, connections, plan.duration)
            for _ in range(plan.reps)
        ]
        levels[str(connections)] = median_result(runs)
        level = levels[str(connections)]
        print(f"  {len(bridges)} bridge(s) c={connections:<3} {level['rps']:8.0f} msg/s"
              f"  p50 {level['p50_ms']:6.2f} ms  p99 {level['p99_ms']:6.2f} ms"
              f"  errors {level['http_errors'] + level['socket_errors']}", flush=True)
    return levels


async def phase(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    ai = ctx.procs.devserver("ai-several", delay=0)

    print("  one bridge on SQLite", flush=True)
    sqlite_bridge, sqlite_token = fresh_bridge(ctx, "several-sqlite", ai)
    session_ids, _ = await ready_sessions(sqlite_bridge, sqlite_token, plan.sessions)
    paths = write_paths(ctx.workdir / "several-sqlite-paths.txt", session_ids)
    sqlite_levels = await _measure(ctx, [sqlite_bridge], paths, sqlite_token)
    ctx.procs.stop(sqlite_bridge)

    with postgres_database(ctx) as dsn:
        print("  two bridges on one PostgreSQL", flush=True)
        first = ctx.procs.bridge("several-pg-a", dsn, ai)  # migrates the database
        second = ctx.procs.bridge("several-pg-b", dsn, ai)
        token = create_key(dsn)
        session_ids, kinds = await ready_sessions(first, token, plan.sessions)
        paths = write_paths(ctx.workdir / "several-pg-paths.txt", session_ids)
        pair_levels = await _measure(ctx, [first, second], paths, token)
        for server in (second, first):
            ctx.procs.stop(server)
    ctx.procs.stop(ai)
    return {
        "generator": ctx.load.name,
        "sessions": plan.sessions,
        "duration_s": plan.duration,
        "reps": plan.reps,
        "sqlite_one_bridge": sqlite_levels,
        "postgresql_two_bridges": pair_levels,
        "throughput_ratio": {
            level: pair_levels[level]["rps"] / sqlite_levels[level]["rps"]
            if sqlite_levels[level]["rps"] else None
            for level in sqlite_levels
        },
        "warm_up_kinds": kinds,
    }
