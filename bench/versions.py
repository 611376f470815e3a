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

A version may be a bridge with parts of its turn taken out
(``name=SRC~writes,metrics``: bench/without.py), as ``make bench``'s parts
part does, to see what a change does to a part's cost.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from loadgen import LoadGenerator, LoadResult, write_paths, write_response_requests
from phases import (
    Context,
    Plan,
    Target,
    alternate,
    fresh_bridge,
    ready_conversations,
    ready_sessions,
)
from procs import Processes

REPS = int(os.environ.get("BENCH_VERSIONS_REPS", "4"))
DURATION = float(os.environ.get("BENCH_VERSIONS_DURATION", "5"))
FACES = os.environ.get("BENCH_VERSIONS_FACES", "sessions").split(",")
LEVELS = tuple(int(n) for n in os.environ.get("BENCH_VERSIONS_LEVELS", "1,32").split(","))
SESSIONS = 256


async def compare(versions: list[tuple[str, str]]) -> None:
    work = Path(tempfile.mkdtemp(prefix="sessionbridge-versions-"))
    procs = Processes(work)
    plan = Plan(reps=REPS, duration=DURATION, warmup=1.0)
    ctx = Context(procs, work, plan, LoadGenerator(), seeded={})
    try:
        ai = procs.devserver("ai", 0)
        targets: dict[str, Target] = {}
        for name, source in versions:
            src, _, parts = source.partition("~")
            # The bridge, its key command and nothing else run from this checkout.
            os.environ["PYTHONPATH"] = str(Path(src).resolve())
            bridge, token = fresh_bridge(
                ctx, f"bridge-{name}", ai, launch_options=["--without", parts] if parts else None
            )
            if "sessions" in FACES:
                ids, _ = await ready_sessions(bridge, token, SESSIONS)
                paths = write_paths(work / f"paths-{name}.txt", ids)
                targets[f"{name} sessions"] = Target(bridge, paths, token)
            if "responses" in FACES:
                ids, _ = await ready_conversations(bridge, token, SESSIONS)
                paths, bodies = write_response_requests(
                    work / f"response-paths-{name}.txt", work / f"response-bodies-{name}.txt", ids
                )
                targets[f"{name} responses"] = Target(bridge, paths, token, bodies)
        runs = await alternate(ctx, targets, ai, LEVELS)
        width = max(len(name) for name in targets)
        print(f"\nMedians of {REPS} runs of {DURATION:.0f} s, alternated"
              " (msg/s, p50, CPU per turn: whole process and its loop thread)")
        for level in LEVELS:
            for name, by_level in runs.items():
                results = by_level[level]

                def median(field: str, results: list[LoadResult] = results) -> float:
                    return statistics.median(getattr(r, field) for r in results)

                print(f"  {name:<{width}} c={level:<3} {median('rps'):7.0f} msg/s"
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
