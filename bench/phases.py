"""The four measurements: throughput, scale, slow AI server, memory.

Each starts the processes it needs, measures, stops them, and returns a plain
dict of figures (what ends up in the JSON file). Nothing here asserts on a
figure: the targets are printed beside the figures by run.py. Starting
processes and seeding databases block this driver's event loop on purpose:
nothing else runs in it meanwhile, and nothing is being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client import BridgeClient, ai_sessions, answered_turns
from conversations import run_conversations
from loadgen import (
    LoadGenerator,
    LoadResult,
    median_result,
    write_ids,
    write_paths,
    write_response_requests,
)
from procs import Processes, Server, create_key
from seed import SeededDb, seed

CONCURRENCY_LEVELS = (1, 32)
# The loop the bridge ships with (asyncio.run in `sessionbridge serve`).
DEFAULT_LOOP = "asyncio"
SLOW_AI_DELAY = 0.2
# Measured sessions on the scale databases; created through the API.
SCALE_MEASURED_SESSIONS = 64


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do (the full run, or --quick)."""

    sessions: int = 256
    duration: float = 6.0
    warmup: float = 1.0
    # Three runs per target and level: on two shared cores single runs of the
    # passthrough vary by a third, and a median of three steadies them.
    reps: int = 3
    scale_small: tuple[int, int] = (100, 10)  # sessions, messages each: 1 thousand
    scale_big: tuple[int, int] = (100_000, 10)  # 1 million messages, 100 thousand sessions
    scale_duration: float = 3.0
    scale_reps: int = 2
    slow_sessions: int = 200
    slow_turns: int = 5
    memory_sessions: int = 100_000
    memory_timebox: float = 180.0
    memory_connections: int = 32
    # The throughput part runs bridge and passthrough on each of these loops.
    loops: tuple[str, ...] = (DEFAULT_LOOP, "uvloop")
    # The profile part (bench/profiling.py): one bridge at 32 connections.
    profile_loop: str = DEFAULT_LOOP
    # The face whose turns are profiled: the sessions API, or POST /v1/responses.
    profile_face: str = "sessions"
    # The connections the profiled load keeps open (1: where one client's latency goes).
    profile_connections: int = 32
    profile_duration: float = 10.0
    profile_rate: int = 100  # py-spy samples per second and thread
    profile_native: bool = True  # C frames too (send, sqlite, the GC, orjson ...)
    profile_cprofile: bool = True  # a second, deterministic profile of the loop thread
    profile_nice: int = -15  # the bridge's niceness while py-spy samples it (root only)
    # The garbage collector's settings to try on the profiled bridge (launch.py's
    # --gc-threshold and --gc-freeze-after); none by default: the bridge as it ships.
    profile_gc_threshold: str | None = None
    profile_gc_freeze: bool = False


QUICK_PLAN = Plan(
    duration=2.0, warmup=0.5, reps=1,
    scale_big=(1_000, 10), scale_duration=1.5, scale_reps=1,
    memory_sessions=1_000, memory_timebox=20.0, profile_duration=3.0,
)


@dataclass
class Context:
    procs: Processes
    workdir: Path
    plan: Plan
    load: LoadGenerator
    # The scale databases, built once and shared with the memory measurement.
    seeded: dict[str, SeededDb]

    def seeded_db(self, name: str, shape: tuple[int, int]) -> SeededDb:
        key = f"{name}-{shape[0]}x{shape[1]}"
        if key not in self.seeded:
            sessions, per_session = shape
            print(f"  seeding {sessions:,} sessions x {per_session} messages ...", flush=True)
            self.seeded[key] = seed(self.workdir / f"{key}.db", sessions, per_session)
        return self.seeded[key]


def fresh_bridge(
    ctx: Context, name: str, ai: Server, loop: str | None = None,
    cprofile: Path | None = None, gc_stats: Path | None = None,
    launch_options: list[str] | None = None,
) -> tuple[Server, str]:
    """A bridge on a new database with one API key; returns it and the key's token."""
    db = ctx.workdir / f"{name}.db"
    token = create_key(db)
    bridge = ctx.procs.bridge(name, db, ai, loop=loop, cprofile=cprofile, gc_stats=gc_stats,
                              launch_options=launch_options)
    return bridge, token


async def ready_conversations(
    bridge: Server, token: str, count: int
) -> tuple[list[str], dict[str, int]]:
    """``count`` conversations of the OpenAI face, each with one completed response."""
    async with BridgeClient(bridge.url, token) as client:
        conversation_ids = await client.create_conversations(count)
        statuses = await client.warm_conversations(conversation_ids)
    return conversation_ids, statuses


async def ready_sessions(
    bridge: Server, token: str, count: int
) -> tuple[list[str], dict[str, int]]:
    """``count`` sessions, each with one answered turn, so their AI sessions exist."""
    async with BridgeClient(bridge.url, token) as client:
        session_ids = await client.create_sessions(count)
        kinds = await client.warm(session_ids)
    return session_ids, kinds


# -- throughput and latency: bridge against the bare passthrough -----------------------------


@dataclass(frozen=True)
class Target:
    """A server under load, with the request paths and the token it is loaded with."""

    server: Server
    paths: Path
    token: str
    # One body a line, sent with the path of the same line (None: loadgen.BODY for all).
    bodies: Path | None = None


# The OpenAI face's turn beside the sessions API's, on the default loop's bridge.
RESPONSES_TARGET = "responses"


def target_name(kind: str, loop: str) -> str:
    """"bridge" and "passthrough" on the default loop; "bridge@uvloop" and so on otherwise."""
    return kind if loop == DEFAULT_LOOP else f"{kind}@{loop}"


async def throughput(ctx: Context) -> dict[str, Any]:
    """Bridge and passthrough on each loop of the plan, all four (or two) alternated in one run.

    Each loop gets its own bridge (own database, own sessions) and its own
    passthrough (the same session ids as that bridge), so every target is
    loaded with byte-identical requests; all of them share one AI server.
    The first loop's bridge is also loaded through the OpenAI face: the same
    question as a ``POST /v1/responses`` in one of as many conversations
    (stored, as a conversation's responses must be), alternated with the rest.
    """
    plan = ctx.plan
    ai = ctx.procs.devserver("ai", delay=0)
    targets: dict[str, Target] = {}
    setup: dict[str, dict[str, Any]] = {}
    for loop in plan.loops:
        bridge, token = fresh_bridge(ctx, f"bridge-{loop}", ai, loop=loop)
        rss_idle = bridge.rss_mb()
        session_ids, warm_kinds = await ready_sessions(bridge, token, plan.sessions)
        ids_file = write_ids(ctx.workdir / f"throughput-sessions-{loop}.txt", session_ids)
        # Same session ids on both targets, so both get byte-identical requests.
        passthrough = ctx.procs.passthrough(f"passthrough-{loop}", ai, ids_file, loop=loop)
        paths = write_paths(ctx.workdir / f"throughput-paths-{loop}.txt", session_ids)
        targets[target_name("bridge", loop)] = Target(bridge, paths, token)
        if loop == plan.loops[0]:
            conversation_ids, warm_statuses = await ready_conversations(
                bridge, token, plan.sessions
            )
            response_paths, bodies = write_response_requests(
                ctx.workdir / "throughput-responses-paths.txt",
                ctx.workdir / "throughput-responses-bodies.txt", conversation_ids,
            )
            targets[RESPONSES_TARGET] = Target(bridge, response_paths, token, bodies)
            setup[loop] = {"responses_warm": warm_statuses}
        targets[target_name("passthrough", loop)] = Target(passthrough, paths, token)
        setup[loop] = {**setup.get(loop, {}), "rss_idle": rss_idle, "warm_kinds": warm_kinds}

    async with contextlib.AsyncExitStack() as stack:
        clients = {
            loop: await stack.enter_async_context(BridgeClient(
                targets[target_name("bridge", loop)].server.url,
                targets[target_name("bridge", loop)].token,
            ))
            for loop in plan.loops
        }
        before = {loop: await client.metrics() for loop, client in clients.items()}
        runs = await alternate(ctx, targets, ai)
        after = {loop: await client.wait_idle() for loop, client in clients.items()}

    by_loop: dict[str, Any] = {}
    for loop in plan.loops:
        bridge_name = target_name("bridge", loop)
        passthrough_name = target_name("passthrough", loop)
        levels: dict[str, Any] = {}
        for connections in CONCURRENCY_LEVELS:
            level: dict[str, Any] = {
                "bridge": median_result(runs[bridge_name][connections]),
                "passthrough": median_result(runs[passthrough_name][connections]),
            }
            level["runs"] = {
                "bridge": [r.to_dict() for r in runs[bridge_name][connections]],
                "passthrough": [r.to_dict() for r in runs[passthrough_name][connections]],
            }
            b, p = level["bridge"], level["passthrough"]
            level["throughput_ratio"] = b["rps"] / p["rps"] if p["rps"] else None
            level["p50_ratio"] = b["p50_ms"] / p["p50_ms"] if p["p50_ms"] else None
            level["p99_ratio"] = b["p99_ms"] / p["p99_ms"] if p["p99_ms"] else None
            level["added_p50_ms"] = b["p50_ms"] - p["p50_ms"]
            b_cpu, p_cpu = b["server_cpu_ms"], p["server_cpu_ms"]
            level["cpu_ratio"] = b_cpu / p_cpu if b_cpu is not None and p_cpu else None
            levels[str(connections)] = level
        bridge = targets[bridge_name].server
        by_loop[loop] = {
            "loop": loop,
            "warm_up_kinds": setup[loop]["warm_kinds"],
            "levels": levels,
            # Every measured turn should have reused its AI session.
            "ai_sessions_during_runs": {
                kind: ai_sessions(after[loop], kind) - ai_sessions(before[loop], kind)
                for kind in ("created", "reused", "recovered")
            },
            "bridge_rss_idle_mb": setup[loop]["rss_idle"],
            "bridge_rss_after_mb": bridge.rss_mb(),
            "bridge_peak_rss_mb": bridge.peak_rss_mb(),
            "passthrough_peak_rss_mb": targets[passthrough_name].server.peak_rss_mb(),
        }
    # The default loop's figures stay at the top level (the targets and the
    # chart read them there); every loop's are under "loops".
    primary = DEFAULT_LOOP if DEFAULT_LOOP in by_loop else plan.loops[0]
    result = {
        "generator": ctx.load.name,
        "sessions": plan.sessions,
        "duration_s": plan.duration,
        "reps": plan.reps,
        **by_loop[primary],
        "loops": by_loop,
    }
    if RESPONSES_TARGET in runs:
        result["responses"] = _responses_beside_sessions(
            runs[RESPONSES_TARGET], runs[target_name("bridge", plan.loops[0])],
            plan.loops[0], setup[plan.loops[0]]["responses_warm"],
        )
    for target in targets.values():
        ctx.procs.stop(target.server)
    ctx.procs.stop(ai)
    return result


def _responses_beside_sessions(
    responses: dict[int, list[LoadResult]], sessions: dict[int, list[LoadResult]],
    loop: str, warm: dict[str, int],
) -> dict[str, Any]:
    """A /v1/responses turn against a /v1/sessions turn of the same bridge, level by level."""
    levels: dict[str, Any] = {}
    for connections in CONCURRENCY_LEVELS:
        r, s = median_result(responses[connections]), median_result(sessions[connections])
        r_cpu, s_cpu = r["server_cpu_ms"], s["server_cpu_ms"]
        levels[str(connections)] = {
            "responses": r,
            "sessions": s,
            "runs": [run.to_dict() for run in responses[connections]],
            "throughput_ratio": r["rps"] / s["rps"] if s["rps"] else None,
            "added_p50_ms": r["p50_ms"] - s["p50_ms"],
            "cpu_ratio": r_cpu / s_cpu if r_cpu is not None and s_cpu else None,
            "added_cpu_ms": r_cpu - s_cpu if r_cpu is not None and s_cpu is not None else None,
        }
    return {"loop": loop, "warm_up_statuses": warm, "levels": levels}


async def measured_run(
    ctx: Context, target: Server, ai: Server, paths: Path, token: str,
    connections: int, duration: float, bodies: Path | None = None,
) -> LoadResult:
    """One load run, with the CPU time the target and the AI server spent per message.

    CPU is read from /proc before and after the run: the target's whole
    process, its main thread (the event loop) and its system time, and its
    context switches.
    """
    def read() -> tuple[float, float, float, float, float]:
        return (target.cpu_seconds(), target.main_thread_cpu_seconds(),
                target.context_switches(), target.system_cpu_seconds(), ai.cpu_seconds())

    before = read()
    result = await ctx.load.run(target.url, paths, token, connections, duration,
                                bodies_file=bodies)
    after = read()
    per_message = 1000 / max(result.requests, 1)
    return dataclasses.replace(
        result,
        server_cpu_ms=(after[0] - before[0]) * per_message,
        server_main_cpu_ms=(after[1] - before[1]) * per_message,
        server_switches=(after[2] - before[2]) / max(result.requests, 1),
        server_sys_cpu_ms=(after[3] - before[3]) * per_message,
        ai_cpu_ms=(after[4] - before[4]) * per_message,
    )


async def alternate(
    ctx: Context, targets: dict[str, Target], ai: Server,
    levels: tuple[int, ...] = CONCURRENCY_LEVELS,
) -> dict[str, dict[int, list[LoadResult]]]:
    """Runs every target at every level, alternating targets so drift hits all alike.

    The plan's reps, duration and warm-up; each run printed as it ends.
    """
    plan = ctx.plan
    runs: dict[str, dict[int, list[LoadResult]]] = {
        name: {c: [] for c in levels} for name in targets
    }
    names = list(targets)
    width = max(len(name) for name in names)
    for connections in levels:
        for target in targets.values():  # unrecorded: opens connections, fills caches
            await ctx.load.run(target.server.url, target.paths, target.token, connections,
                               plan.warmup, bodies_file=target.bodies)
        for rep in range(plan.reps):
            # A, B then B, A: a slow drift of the machine cancels out over two reps.
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                target = targets[name]
                result = await measured_run(
                    ctx, target.server, ai, target.paths, target.token, connections,
                    plan.duration, target.bodies,
                )
                runs[name][connections].append(result)
                print(f"  {name:<{width}} c={connections:<3} rep {rep + 1}: {result.rps:8.0f}"
                      f" msg/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                      f"  CPU/msg {result.server_cpu_ms:.2f} ms (loop thread"
                      f" {result.server_main_cpu_ms:.2f}; AI server {result.ai_cpu_ms:.2f})"
                      f"  errors {result.http_errors + result.socket_errors}", flush=True)
    return runs


# -- scale: turn latency on a small and on a large database -------------------------------------


async def scale(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    small = ctx.seeded_db("scale", plan.scale_small)
    big = ctx.seeded_db("scale", plan.scale_big)
    ai = ctx.procs.devserver("ai-scale", delay=0)
    bridges: dict[str, tuple[Server, SeededDb, Path, float]] = {}
    for label, db in (("small", small), ("big", big)):
        bridge = ctx.procs.bridge(f"bridge-scale-{label}", db.path, ai)
        rss_idle = bridge.rss_mb()
        session_ids, _ = await ready_sessions(bridge, db.token, SCALE_MEASURED_SESSIONS)
        paths = write_paths(ctx.workdir / f"scale-{label}-paths.txt", session_ids)
        bridges[label] = (bridge, db, paths, rss_idle)
        print(f"  {label}: {db.messages:,} messages in {db.path.name} ({db.size_mb:.0f} MB,"
              f" seeded in {db.seconds:.1f}s), bridge idle RSS {rss_idle:.1f} MB", flush=True)

    runs: dict[str, list[LoadResult]] = {"small": [], "big": []}
    for rep in range(plan.scale_reps):
        order = ["small", "big"] if rep % 2 == 0 else ["big", "small"]
        for label in order:
            bridge, db, paths, _ = bridges[label]
            run = await measured_run(ctx, bridge, ai, paths, db.token, 1, plan.scale_duration)
            runs[label].append(run)
            print(f"  {label:<5} rep {rep + 1}: {run.requests} turns, p50 {run.p50_ms:.2f} ms,"
                  f" p99 {run.p99_ms:.2f} ms, CPU/turn {run.server_cpu_ms:.2f} ms", flush=True)

    result: dict[str, Any] = {}
    for label, (bridge, db, _, rss_idle) in bridges.items():
        result[label] = {
            "stored_sessions": len(db.session_ids),
            "stored_messages": db.messages,
            "db_mb": db.size_mb,
            "bridge_rss_idle_mb": rss_idle,
            "bridge_rss_after_mb": bridge.rss_mb(),
            **median_result(runs[label]),
        }
        ctx.procs.stop(bridge)
    ctx.procs.stop(ai)
    small_p50 = result["small"]["p50_ms"]
    result["p50_ratio_big_to_small"] = result["big"]["p50_ms"] / small_p50 if small_p50 else None
    return result


# -- concurrency against a slow AI server ------------------------------------------------------


async def slow(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    ai = ctx.procs.devserver("ai-slow", delay=SLOW_AI_DELAY)
    bridge, token = fresh_bridge(ctx, "bridge-slow", ai)
    async with BridgeClient(bridge.url, token) as client:
        session_ids = await client.create_sessions(plan.slow_sessions)
    # Fresh sessions: each conversation's first turn also creates its AI session.
    bridge_run = await _conversations(bridge, ai, token, session_ids, plan)
    async with BridgeClient(bridge.url, token) as client:
        samples = await client.wait_idle()
    ctx.procs.stop(bridge)
    # The same client and AI server through the passthrough: what this machine
    # and this client cost anyway, so the bridge's own share can be told apart.
    ids_file = write_ids(ctx.workdir / "slow-sessions.txt", session_ids)
    passthrough = ctx.procs.passthrough("passthrough-slow", ai, ids_file)
    passthrough_run = await _conversations(passthrough, ai, token, session_ids, plan)
    for server in (passthrough, ai):
        ctx.procs.stop(server)
    ideal = plan.slow_turns * SLOW_AI_DELAY
    return {
        "sessions": plan.slow_sessions,
        "turns_each": plan.slow_turns,
        "ai_delay_s": SLOW_AI_DELAY,
        "ideal_s": ideal,
        **bridge_run,
        "wall_over_ideal": bridge_run["wall_s"] / ideal,
        "passthrough": passthrough_run,
        "passthrough_wall_over_ideal": passthrough_run["wall_s"] / ideal,
        "locked_sessions_after": samples.get("sessionbridge_locked_sessions"),
    }


async def _conversations(
    target: Server, ai: Server, token: str, session_ids: list[str], plan: Plan
) -> dict[str, Any]:
    """One run of the conversations, with the CPU the target and the AI server spent."""
    target_cpu, ai_cpu = target.cpu_seconds(), ai.cpu_seconds()
    result = await run_conversations(target.url, token, session_ids, plan.slow_turns)
    result["target_cpu_s"] = target.cpu_seconds() - target_cpu
    result["ai_cpu_s"] = ai.cpu_seconds() - ai_cpu
    return result


# -- memory: RSS idle and after many sessions were each used once ---------------------------


async def memory(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    db = ctx.seeded_db("scale", plan.scale_big)
    ai = ctx.procs.devserver("ai-memory", delay=0)
    bridge = ctx.procs.bridge("bridge-memory", db.path, ai)
    await asyncio.sleep(1.0)  # let start-up allocations settle before "idle"
    rss_idle = bridge.rss_mb()
    target = min(plan.memory_sessions, len(db.session_ids))
    # The seeded sessions have no AI session yet, so each turn creates one.
    paths = write_paths(ctx.workdir / "memory-paths.txt", db.session_ids[:target])
    async with BridgeClient(bridge.url, db.token) as client:
        before = await client.metrics()
        print(f"  one turn on each of {target:,} stored sessions"
              f" (time box {plan.memory_timebox:.0f}s) ...", flush=True)
        started = time.monotonic()
        load = await ctx.load.run(bridge.url, paths, db.token, plan.memory_connections,
                                  plan.memory_timebox, limit=target)
        seconds = time.monotonic() - started
        # "After traffic stops": in-flight turns finish first.
        after = await client.wait_idle()
    used = answered_turns(after) - answered_turns(before)
    result = {
        "stored_sessions": len(db.session_ids),
        "stored_messages_before": db.messages,
        "sessions_targeted": target,
        "sessions_used_once": int(used),
        "ai_sessions_created": int(ai_sessions(after, "created") - ai_sessions(before, "created")),
        "seconds": seconds,
        "turns_per_s": used / seconds if seconds else 0.0,
        "http_errors": load.http_errors,
        "socket_errors": load.socket_errors,
        "bridge_rss_idle_mb": rss_idle,
        "bridge_rss_after_mb": bridge.rss_mb(),
        "bridge_peak_rss_mb": bridge.peak_rss_mb(),
        "locked_sessions_after": after.get("sessionbridge_locked_sessions"),
        "turns_in_flight_after": after.get("sessionbridge_turns_in_flight"),
    }
    for server in (bridge, ai):
        ctx.procs.stop(server)
    return result
