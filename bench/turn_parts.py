"""The parts part: what a turn's parts cost, each measured by taking it out.

The profile part says where a sessions turn's CPU goes, in samples. This
part measures the two parts a profile cannot price whole (what a part makes
the rest do is counted elsewhere in a profile): the bridge as it ships, and
the same bridge with its two committed writes taken out, with its metrics
taken out, and with both (bench/without.py), beside the bare passthrough on
the same sessions, all alternated in one run against one AI server. The
differences are what the writes and the metrics cost a turn; what is left
over the passthrough without both is the rest of the bridge's own work
(authentication, validation, the session's lock and row cache, the turn's
record, JSON both ways).
"""

from __future__ import annotations

from typing import Any

from loadgen import LoadResult, median_result, write_ids, write_paths
from phases import (
    CONCURRENCY_LEVELS,
    DEFAULT_LOOP,
    Context,
    Target,
    alternate,
    fresh_bridge,
    ready_sessions,
)

WHOLE = "bridge"
PASSTHROUGH = "passthrough"
# Target name -> the parts taken out of it (bench/launch.py --without).
TAKEN_OUT = {
    WHOLE: "",
    "bridge~metrics": "metrics",
    "bridge~writes": "writes",
    "bridge~writes,metrics": "writes,metrics",
}


async def phase(ctx: Context) -> dict[str, Any]:
    ai = ctx.procs.devserver("ai", delay=0)
    targets: dict[str, Target] = {}
    whole_ids: list[str] = []
    for name, parts in TAKEN_OUT.items():
        # Every bridge and the passthrough through bench/launch.py, alike.
        bridge, token = fresh_bridge(
            ctx, name.replace("~", "-").replace(",", "-"), ai, loop=DEFAULT_LOOP,
            launch_options=["--without", parts] if parts else None,
        )
        session_ids, _ = await ready_sessions(bridge, token, ctx.plan.sessions)
        paths = write_paths(ctx.workdir / f"parts-paths-{len(targets)}.txt", session_ids)
        targets[name] = Target(bridge, paths, token)
        if name == WHOLE:
            whole_ids = session_ids
    # The whole bridge's sessions and requests, byte for byte.
    ids_file = write_ids(ctx.workdir / "parts-sessions.txt", whole_ids)
    passthrough = ctx.procs.passthrough("parts-passthrough", ai, ids_file, loop=DEFAULT_LOOP)
    whole = targets[WHOLE]
    targets[PASSTHROUGH] = Target(passthrough, whole.paths, whole.token)
    runs = await alternate(ctx, targets, ai)
    return {"levels": {str(level): figures(runs, level) for level in CONCURRENCY_LEVELS}}


def figures(runs: dict[str, dict[int, list[LoadResult]]], level: int) -> dict[str, Any]:
    """Each target's medians, and each bridge's CPU a turn against the whole one and the bare."""
    medians = {name: median_result(by_level[level]) for name, by_level in runs.items()}
    whole, bare = medians[WHOLE], medians[PASSTHROUGH]
    rows: dict[str, Any] = {}
    for name, m in medians.items():
        row = {"figures": m, "runs": [r.to_dict() for r in runs[name][level]]}
        if name != PASSTHROUGH:
            row["cpu_saved_ms"] = whole["server_cpu_ms"] - m["server_cpu_ms"]
            row["throughput_ratio"] = m["rps"] / bare["rps"]
            row["added_p50_ms"] = m["p50_ms"] - bare["p50_ms"]
            row["cpu_ratio"] = m["server_cpu_ms"] / bare["server_cpu_ms"]
            # Paired: each rep's ratio to the passthrough's run next to it.
            row["throughput_ratios"] = [
                mine.rps / theirs.rps
                for mine, theirs in zip(runs[name][level], runs[PASSTHROUGH][level], strict=True)
            ]
        rows[name] = row
    return rows


def print_report(report: dict[str, Any]) -> None:
    print("A sessions turn's parts, each taken out (the same bridge; alternated in one run;"
          " medians)")
    print(f"  {'clients':>7}  {'target':<22}{'msg/s':>8}{'p50 ms':>8}{'CPU ms':>8}"
          f"{'saved':>8}   against the passthrough: msg/s, added p50, CPU")
    for level, rows in report["levels"].items():
        for name, row in rows.items():
            f = row["figures"]
            line = (f"  {level:>7}  {name:<22}{f['rps']:8.0f}{f['p50_ms']:8.2f}"
                    f"{f['server_cpu_ms']:8.3f}")
            if name != PASSTHROUGH:
                spread = "/".join(f"{r:.2f}" for r in row["throughput_ratios"])
                line += (f"{row['cpu_saved_ms']:8.3f}   {row['throughput_ratio']:.2f}x"
                         f" ({spread}), {row['added_p50_ms']:+.2f} ms, {row['cpu_ratio']:.2f}x")
            print(line)
    print("  (saved: CPU a turn the whole bridge spends over this one, ms)")
    print()

