"""Two (or more) versions of the bridge side by side: the same load, alternated in one run.

On a shared machine the figures of one run move by tens of percent from the
next, so two versions are compared in the same run, in alternation (A, B, then
B, A), each bridge from its own checkout's ``src`` folder (a git worktree of
the older commit, say), against one reference AI server:

    python bench/versions.py old=../wt-old/src new=src
    BENCH_VERSIONS_FACES=sessions,responses BENCH_VERSIONS_REPS=5 python bench/versions.py ...

Per version, face and level (1 and 32 connections): messages/s, p50 and CPU
per turn (whole process and its loop thread), medians of the runs. The faces
are the sessions API's POST and ``POST /v1/responses`` in a conversation, as
in the throughput part. Each checkout must hold its migrations beside its
``src`` (a worktree does).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadgen import LoadGenerator, LoadResult, write_paths, write_response_requests
from phases import Context, Plan, fresh_bridge, measured_run, ready_conversations, ready_sessions
from procs import Processes

REPS = int(os.environ.get("BENCH_VERSIONS_REPS", "4"))
DURATION = float(os.environ.get("BENCH_VERSIONS_DURATION", "5"))
FACES = os.environ.get("BENCH_VERSIONS_FACES", "sessions").split(",")
LEVELS = [int(n) for n in os.environ.get("BENCH_VERSIONS_LEVELS", "1,32").split(",")]
SESSIONS = 256


async def compare(versions: list[tuple[str, str]]) -> None:
    work = Path(tempfile.mkdtemp(prefix="sessionbridge-versions-"))
    procs = Processes(work)
    ctx = Context(procs, work, Plan(), LoadGenerator(), seeded={})
    try:
        ai = procs.devserver("ai", 0)
        targets: dict[tuple[str, str], tuple[Any, Path, str, Path | None]] = {}
        for name, src in versions:
            # The bridge, its key command and nothing else run from this checkout.
            os.environ["PYTHONPATH"] = str(Path(src).resolve())
            bridge, token = fresh_bridge(ctx, f"bridge-{name}", ai)
            if "sessions" in FACES:
                ids, _ = await ready_sessions(bridge, token, SESSIONS)
                paths = write_paths(work / f"paths-{name}.txt", ids)
                targets[(name, "sessions")] = (bridge, paths, token, None)
            if "responses" in FACES:
                ids, _ = await ready_conversations(bridge, token, SESSIONS)
                paths, bodies = write_response_requests(
                    work / f"response-paths-{name}.txt", work / f"response-bodies-{name}.txt", ids
                )
                targets[(name, "responses")] = (bridge, paths, token, bodies)
        runs: dict[tuple[str, str], dict[int, list[LoadResult]]] = {
            target: {level: [] for level in LEVELS} for target in targets
        }
        for level in LEVELS:
            for bridge, paths, token, bodies in targets.values():  # warm-up, not recorded
                await ctx.load.run(bridge.url, paths, token, level, 1.0, bodies_file=bodies)
            for rep in range(REPS):
                order = list(targets) if rep % 2 == 0 else list(targets)[::-1]
                for target in order:
                    bridge, paths, token, bodies = targets[target]
                    result = await measured_run(
                        ctx, bridge, ai, paths, token, level, DURATION, bodies
                    )
                    runs[target][level].append(result)
                    print(f"  {target[0]:>8} {target[1]:<9} c={level:<3} rep {rep + 1}:"
                          f" {result.rps:7.0f} msg/s  p50 {result.p50_ms:6.2f} ms  CPU/turn"
                          f" {result.server_cpu_ms:.3f} ms (loop thread"
                          f" {result.server_main_cpu_ms:.3f})  errors"
                          f" {result.http_errors + result.socket_errors}", flush=True)
        print(f"\nMedians of {REPS} runs of {DURATION:.0f} s, alternated"
              " (msg/s, p50, CPU per turn: whole process and its loop thread)")
        for level in LEVELS:
            for target, by_level in runs.items():
                results = by_level[level]

                def median(field: str, results: list[LoadResult] = results) -> float:
                    return statistics.median(getattr(r, field) for r in results)

                print(f"  {target[0]:>8} {target[1]:<9} c={level:<3} {median('rps'):7.0f} msg/s"
                      f"  p50 {median('p50_ms'):6.2f} ms  CPU/turn {median('server_cpu_ms'):.3f}"
                      f" ms ({median('server_main_cpu_ms'):.3f})")
    finally:
        procs.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    versions = [tuple(arg.split("=", 1)) for arg in argv if "=" in arg]
    if len(versions) < 2 or len(versions) != len(argv):
        print(__doc__, file=sys.stderr)
        return 2
    asyncio.run(compare(versions))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
