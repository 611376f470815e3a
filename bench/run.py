"""sessionbridge benchmark: the bridge beside a bare aiohttp passthrough, on loopback.

Starts the reference AI server, the bridge and a minimal aiohttp passthrough
(bench/passthrough.py) as separate processes on 127.0.0.1 and measures:

- throughput: messages/s and p50/p99 latency at 1 and 32 clients over a few
  hundred sessions, bridge and passthrough alternately, and their ratios, CPU
  per turn of each; on the default asyncio loop and on uvloop side by side;
- profile: where a bridge turn's CPU goes at 32 connections: py-spy samples of
  every thread and a cProfile of the event loop's thread (profiling.py), the
  tables in bench/results/<timestamp>-profile.txt;
- scale: p50 turn latency with about a thousand and with a million stored
  messages (100 thousand sessions);
- slow: 200 sessions x 5 turns at once against a 200 ms AI server, wall time
  against the ideal;
- memory: the bridge's RSS idle and after 100 thousand stored sessions were
  each used once, and the lock registry's size once traffic stops;
- several: two bridges on one PostgreSQL against one bridge on SQLite, same
  load and AI server (several.py);
- real: a real model (llama-server from `make model`): one long conversation
  with a restart, through the bridge and through a naive client, turn by turn
  (real_model.py; skipped, with the reason, when .venv-model is absent);
- responses: OpenAI's Responses API through the bridge with the openai SDK
  (a previous_response_id chain and a conversation) beside the same turns sent
  straight to llama-server, byte-stable and naive (responses.py; skipped like
  real);
- replicas: two real llama-servers behind the bridge's placement and behind
  an nginx round robin, then one of them killed mid-run (replicas.py; skipped
  without .venv-model or nginx).

The figures go to stdout, bench/results/<timestamp>.json and .png. Targets
are printed beside them and never asserted: the exit status says only
whether the benchmark ran, not how fast anything was.

    python bench/run.py                 # everything, a few minutes
    python bench/run.py --quick         # a smoke run: short, small databases
    python bench/run.py --only throughput,slow
    python bench/run.py --no-real       # without the real model's parts (real, responses,
                                        # replicas; --quick leaves them out too)
    python bench/run.py --only throughput,profile --no-uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import chart
import phases
import profiling
import real_model
import replicas
import responses
import several
import turn_parts
from client import SetupError
from loadgen import LoadGenerator
from procs import Processes, StartError

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PHASES: dict[str, Callable[[phases.Context], Coroutine[Any, Any, dict[str, Any]]]] = {
    "throughput": phases.throughput,
    "profile": profiling.phase,
    "parts": turn_parts.phase,
    "scale": phases.scale,
    "slow": phases.slow,
    "memory": phases.memory,
    "several": several.phase,
    "real": real_model.phase,
    "responses": responses.phase,
    "replicas": replicas.phase,
}
# The parts that run a real model: on unless --no-real (or --quick).
MODEL_PARTS = ("real", "responses", "replicas")

# The targets the project set itself: printed with the figures, never asserted.
TARGET_THROUGHPUT_RATIO = 0.6
TARGET_ADDED_P50_MS = 0.5
TARGET_SLOW_OVER_IDEAL = 1.10
TARGET_RSS_MB = 60.0
TARGET_STORED_SESSIONS = 100_000
# "Flat" has no number in the issue; this is how the benchmark reads it.
FLAT_RATIO = 1.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="short runs, small databases instead of 100k sessions / 1M messages")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--duration", type=float, help="seconds per measured load run")
    parser.add_argument("--reps", type=int, help="measured runs per target and level")
    parser.add_argument("--memory-timebox", type=float,
                        help="seconds allowed for using the stored sessions once")
    parser.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                        help="the real-model parts, real, responses and replicas"
                        " (default: on, off with --quick)")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the throughput part's bridge and passthrough on uvloop,"
                        " beside the default asyncio loop (default: on)")
    parser.add_argument("--profile-loop", choices=("asyncio", "uvloop"),
                        help="the loop the profiled bridge runs on (default asyncio)")
    parser.add_argument("--profile-face", choices=("sessions", "responses"),
                        help="the turns profiled: POST /v1/sessions/{id}/messages (default) or"
                        " POST /v1/responses in a conversation")
    parser.add_argument("--profile-connections", type=int,
                        help="connections of the profiled load (default 32)")
    parser.add_argument("--profile-duration", type=float,
                        help="seconds of each of the profile part's three runs")
    parser.add_argument("--profile-rate", type=int, help="py-spy samples per second")
    parser.add_argument("--profile-native", action=argparse.BooleanOptionalAction,
                        default=None, help="py-spy's C frames (default: on)")
    parser.add_argument("--cprofile", action=argparse.BooleanOptionalAction, default=None,
                        help="the profile part's cProfile run (default: on)")
    parser.add_argument("--profile-gc-threshold", metavar="N[,N1,N2]",
                        help="a trial: the profiled bridge with this gc.set_threshold")
    parser.add_argument("--profile-gc-freeze", action="store_true", default=None,
                        help="a trial: the profiled bridge calls gc.freeze() after warm-up")
    parser.add_argument("--no-wrk", action="store_true",
                        help="use the Python load generator even when wrk is installed")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results",
                        help="folder for the JSON and PNG (default bench/results)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the databases and server logs of the run")
    args = parser.parse_args(argv)
    args.phases = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.real is False or (args.real is None and args.quick):
        args.phases = [name for name in args.phases if name not in MODEL_PARTS]
    elif args.real:
        args.phases += [name for name in MODEL_PARTS if name not in args.phases]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))};"
                     f" choose from {', '.join(PHASES)}")
    return args


def make_plan(args: argparse.Namespace) -> phases.Plan:
    plan = phases.QUICK_PLAN if args.quick else phases.Plan()
    overrides = {
        "duration": args.duration, "reps": args.reps, "memory_timebox": args.memory_timebox,
        "profile_loop": args.profile_loop, "profile_face": args.profile_face,
        "profile_duration": args.profile_duration,
        "profile_connections": args.profile_connections,
        "profile_rate": args.profile_rate, "profile_native": args.profile_native,
        "profile_cprofile": args.cprofile, "profile_gc_threshold": args.profile_gc_threshold,
        "profile_gc_freeze": args.profile_gc_freeze,
    }
    if not args.uvloop:
        overrides["loops"] = (phases.DEFAULT_LOOP,)
    elif not uvloop_available():
        print("note: uvloop is not installed (pip install -e '.[bench]'): the default loop only",
              flush=True)
        overrides["loops"] = (phases.DEFAULT_LOOP,)
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _first_line(argv: list[str]) -> str | None:
    """The first line a command prints, or None (wrk -v exits 1, so the status is ignored)."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def environment(load: LoadGenerator) -> dict[str, Any]:
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
        "load_generator": load.name,
        "wrk": _first_line([load.wrk, "-v"]) if load.wrk else None,
        "commit": f"{commit}{' (modified)' if dirty else ''}" if commit else None,
    }


# -- reading the figures -----------------------------------------------------------------------


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def target_rows(report: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, figure, stated target, met) for every target whose part ran."""
    rows: list[tuple[str, str, str, bool | None]] = []
    throughput = report.get("throughput")
    if throughput:
        ratio = throughput["levels"]["32"]["throughput_ratio"]
        rows.append(("throughput at 32 clients, bridge/passthrough", f"{ratio:.2f}x",
                     f">= {TARGET_THROUGHPUT_RATIO}x", ratio >= TARGET_THROUGHPUT_RATIO))
        added = throughput["levels"]["1"]["added_p50_ms"]
        rows.append(("added p50 latency at 1 client", f"{added:+.2f} ms",
                     f"<= {TARGET_ADDED_P50_MS} ms", added <= TARGET_ADDED_P50_MS))
    scale = report.get("scale")
    if scale:
        ratio = scale["p50_ratio_big_to_small"]
        rows.append((f"p50 with {scale['big']['stored_messages']:,} vs "
                     f"{scale['small']['stored_messages']:,} stored messages",
                     f"{ratio:.2f}x", f"flat (read as <= {FLAT_RATIO}x)", ratio <= FLAT_RATIO))
    slow = report.get("slow")
    if slow:
        rows.append(("slow AI server: wall time / ideal",
                     f"{slow['wall_s']:.2f} s / {slow['ideal_s']:.2f} s",
                     f"<= {TARGET_SLOW_OVER_IDEAL:.2f}x",
                     slow["wall_over_ideal"] <= TARGET_SLOW_OVER_IDEAL))
    memory = report.get("memory")
    if memory:
        rss = memory["bridge_rss_after_mb"]
        enough = memory["stored_sessions"] >= TARGET_STORED_SESSIONS
        rows.append((f"bridge RSS, {memory['stored_sessions']:,} sessions stored,"
                     f" {memory['sessions_used_once']:,} used once", f"{rss:.1f} MB",
                     f"<= {TARGET_RSS_MB:.0f} MB with 100k stored",
                     rss <= TARGET_RSS_MB if enough else None))
        locked = memory["locked_sessions_after"]
        rows.append(("lock registry after traffic", f"{locked:.0f} entries", "0", locked == 0))
    if "responses" in report:
        rows += responses.target_rows(report["responses"])
    return rows


def print_loops(throughput: dict[str, Any]) -> None:
    """Each loop's bridge and passthrough side by side: the figures the loops are judged by."""
    loops = throughput.get("loops", {})
    if not loops:
        return
    print("Event loops side by side (same run, alternated; medians; CPU from /proc)")
    print(f"  {'loop':<9}{'target':<20}{'msg/s c=32':>11}{'p50 c=1':>9}{'CPU ms/turn':>12}"
          f"{'loop thr.':>10}{'kernel':>8}{'CPU c=1':>9}{'switch/turn':>12}")
    for loop, figures in loops.items():
        many, one = figures["levels"]["32"], figures["levels"]["1"]
        for target in ("bridge", "passthrough"):
            m, o = many[target], one[target]
            print(f"  {loop:<9}{target:<20}{m['rps']:11.0f}{o['p50_ms']:9.2f}"
                  f"{m['server_cpu_ms']:12.3f}{m['server_main_cpu_ms']:10.3f}"
                  f"{m['server_sys_cpu_ms']:8.3f}{o['server_cpu_ms']:9.3f}"
                  f"{m['server_switches']:12.1f}")
        print(f"  {loop:<9}{'bridge/passthrough':<20}{many['throughput_ratio']:10.2f}x"
              f"{one['added_p50_ms']:+8.2f} {many['cpu_ratio']:10.2f}x")
    if len(loops) > 1 and "asyncio" in loops:
        base = loops["asyncio"]["levels"]
        for loop, figures in loops.items():
            if loop == "asyncio":
                continue
            for target in ("bridge", "passthrough"):
                m, b = figures["levels"]["32"][target], base["32"][target]
                o, bo = figures["levels"]["1"][target], base["1"][target]
                print(f"  {loop}/asyncio, {target:<12}: msg/s {m['rps'] / b['rps']:.2f}x,"
                      f" p50 c=1 {o['p50_ms'] - bo['p50_ms']:+.2f} ms,"
                      f" CPU/turn {m['server_cpu_ms'] / b['server_cpu_ms']:.2f}x")
    print("  (msg/s at 32 clients, p50 in ms at 1 client, CPU ms per turn at 32 clients:"
          " whole process, its loop thread, its kernel (system) time, and the whole process"
          " at 1 client; context switches per turn at 32; ratio row: msg/s, added p50, CPU)")
    print()


def print_faces(throughput: dict[str, Any]) -> None:
    """A /v1/responses turn beside a /v1/sessions turn of the same bridge."""
    faces = throughput.get("responses")
    if not faces:
        return
    print(f"A turn through each face (the same {faces['loop']} bridge, alternated in the same"
          f" run; medians; /v1/responses: the same question in one of"
          f" {throughput['sessions']} conversations, stored)")
    print(f"  {'clients':>7}  {'face':<22}{'msg/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'CPU ms/turn':>12}{'loop thr.':>10}")
    for level, figures in sorted(faces["levels"].items(), key=lambda kv: int(kv[0])):
        for face, label in (("sessions", "/v1/sessions"), ("responses", "/v1/responses")):
            f = figures[face]
            print(f"  {level:>7}  {label:<22}{f['rps']:9.0f}{f['p50_ms']:9.2f}{f['p99_ms']:9.2f}"
                  f"{f['http_errors'] + f['socket_errors']:8d}{f['server_cpu_ms']:12.3f}"
                  f"{f['server_main_cpu_ms']:10.3f}")
        print(f"  {level:>7}  {'responses/sessions':<22}{figures['throughput_ratio']:8.2f}x"
              f"{figures['added_p50_ms']:+8.2f} {'':>17}{figures['cpu_ratio']:11.2f}x"
              f"   (CPU {figures['added_cpu_ms']:+.3f} ms a turn)")
    print()


def print_report(report: dict[str, Any]) -> None:
    print()
    throughput = report.get("throughput")
    if throughput:
        print(f"Throughput and latency ({throughput['generator']}, {throughput['sessions']}"
              f" sessions, {throughput['reps']} x {throughput['duration_s']:.0f} s per target"
              f" and level; medians)")
        print(f"  {'clients':>7}  {'target':<22}{'msg/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'errors':>8}{'CPU ms/msg':>12}{'AI CPU':>8}")
        for level, figures in sorted(throughput["levels"].items(), key=lambda kv: int(kv[0])):
            for target in ("bridge", "passthrough"):
                f = figures[target]
                print(f"  {level:>7}  {target:<22}{f['rps']:9.0f}{f['p50_ms']:9.2f}"
                      f"{f['p99_ms']:9.2f}{f['http_errors'] + f['socket_errors']:8d}"
                      f"{f['server_cpu_ms']:12.2f}{f['ai_cpu_ms']:8.2f}")
            print(f"  {level:>7}  {'bridge/passthrough':<22}{figures['throughput_ratio']:8.2f}x"
                  f"{figures['p50_ratio']:8.2f}x{figures['p99_ratio']:8.2f}x"
                  f"   (p50 {figures['added_p50_ms']:+.2f} ms)")
        ai = throughput["ai_sessions_during_runs"]
        both = " (both faces)" if throughput.get("responses") else ""
        print(f"  AI sessions during the measured runs{both}: reused {ai['reused']:.0f},"
              f" created {ai['created']:.0f}, recovered {ai['recovered']:.0f}")
        print(f"  bridge RSS: idle {throughput['bridge_rss_idle_mb']:.1f} MB, peak"
              f" {throughput['bridge_peak_rss_mb']:.1f} MB (passthrough peak"
              f" {throughput['passthrough_peak_rss_mb']:.1f} MB)")
        print()
        print_loops(throughput)
        print_faces(throughput)
    profile = report.get("profile")
    if profile:
        for line in profiling.summary(profile):
            print(line)
        print()
    if "parts" in report:
        turn_parts.print_report(report["parts"])
    scale = report.get("scale")
    if scale:
        print("Scale (1 client, fresh sessions on a seeded database; medians)")
        for label in ("small", "big"):
            s = scale[label]
            print(f"  {s['stored_messages']:>10,} messages, {s['stored_sessions']:>7,} sessions"
                  f" ({s['db_mb']:.0f} MB): p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms,"
                  f" {s['requests']} turns, errors {s['http_errors'] + s['socket_errors']},"
                  f" bridge RSS idle {s['bridge_rss_idle_mb']:.1f} MB")
        print(f"  p50 ratio large/small: {scale['p50_ratio_big_to_small']:.2f}x")
        print()
    slow = report.get("slow")
    if slow:
        print(f"Slow AI server ({slow['ai_delay_s'] * 1000:.0f} ms per /chat,"
              f" {slow['sessions']} sessions x {slow['turns_each']} turns at once)")
        print(f"  bridge:      wall {slow['wall_s']:.2f} s against ideal {slow['ideal_s']:.2f} s"
              f" ({(slow['wall_over_ideal'] - 1) * 100:+.1f}%); slowest conversation"
              f" {slow['slowest_conversation_s']:.2f} s; outcomes {slow['outcomes']}")
        floor = slow["passthrough"]
        print(f"  passthrough: wall {floor['wall_s']:.2f} s"
              f" ({(slow['passthrough_wall_over_ideal'] - 1) * 100:+.1f}%; same client and"
              f" AI server, AI sessions made up front); outcomes {floor['outcomes']}")
        for name, run in (("bridge", slow), ("passthrough", floor)):
            print(f"  {name + ':':<12} turn p50 {run['turn_p50_ms']:.0f} ms, max"
                  f" {run['turn_max_ms']:.0f} ms; CPU {run['target_cpu_s']:.2f} s (AI server"
                  f" {run['ai_cpu_s']:.2f} s, client {run['client_cpu_s']:.2f} s)")
        print(f"  the bridge's own share: {slow['wall_s'] - floor['wall_s']:+.2f} s over the"
              " passthrough; the rest is what the client, the AI server and the"
              " passthrough cost on these cores")
        print()
    memory = report.get("memory")
    if memory:
        print("Memory (bridge process, VmRSS / VmHWM)")
        print(f"  idle with {memory['stored_sessions']:,} sessions stored:"
              f" {memory['bridge_rss_idle_mb']:.1f} MB")
        print(f"  after {memory['sessions_used_once']:,} of {memory['sessions_targeted']:,}"
              f" sessions were used once ({memory['seconds']:.0f} s,"
              f" {memory['turns_per_s']:.0f} turns/s, errors"
              f" {memory['http_errors'] + memory['socket_errors']}):"
              f" {memory['bridge_rss_after_mb']:.1f} MB,"
              f" peak {memory['bridge_peak_rss_mb']:.1f} MB")
        print(f"  lock registry after traffic: {memory['locked_sessions_after']:.0f} entries")
        print()
    if "real" in report:
        real_model.print_report(report["real"])
    if "responses" in report:
        responses.print_report(report["responses"])
    if "replicas" in report:
        replicas.print_report(report["replicas"])
    rows = target_rows(report)
    if rows:
        print("Targets (reported, never asserted)")
        width = max(len(row[0]) for row in rows)
        for name, figure, target, met in rows:
            print(f"  {name:<{width}}  {figure:>18}  target {target:<28} {_verdict(met)}")
        print()


# -- running ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    load = LoadGenerator(prefer_wrk=not args.no_wrk)
    if load.name != "wrk":
        reason = "--no-wrk" if args.no_wrk else "wrk is not installed (apt-get install wrk)"
        print(f"note: {reason}: using the Python load generator, which shares the two cores"
              " with the servers, so absolute figures are low; the ratios still compare.",
              flush=True)
    plan = make_plan(args)
    report: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "plan": dataclasses.asdict(plan),
        "environment": environment(load),
    }
    procs = Processes(workdir)
    ctx = phases.Context(procs, workdir, plan, load, seeded={})
    failures: dict[str, str] = {}
    try:
        for name in args.phases:
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                report[name] = await PHASES[name](ctx)
            except (StartError, SetupError, RuntimeError, OSError, aiohttp.ClientError,
                    subprocess.SubprocessError, sqlite3.Error) as exc:
                # A part that could not run is reported and the others still run;
                # the exit status then says the benchmark did not complete.
                failures[name] = f"{type(exc).__name__}: {exc}"
                print(f"  {name} failed: {failures[name]}", flush=True)
            else:
                report[name]["phase_seconds"] = time.monotonic() - started
            finally:
                procs.close()  # whatever a failed part left running
    finally:
        procs.close()
    if failures:
        report["failures"] = failures
    return report


def save(report: dict[str, Any], results: Path) -> tuple[Path, Path | None]:
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = results / f"{stamp}.json"
    profile = report.get("profile")
    if profile:
        # The tables beside the figures; the raw samples and the pstats file
        # too, for another reading (flamegraph.pl, snakeviz, pstats).
        text_path = results / f"{stamp}-profile.txt"
        text_path.write_text(profile.pop("text"))
        saved = {"tables": str(text_path)}
        suffixes = {"pyspy_raw": "-pyspy-raw.txt", "cprofile_pstats": "-cprofile.pstats"}
        for name, source in profile.get("files", {}).items():
            if Path(source).exists():
                target = results / f"{stamp}{suffixes[name]}"
                shutil.copyfile(source, target)
                saved[name] = str(target)
        profile["files"] = saved
        print(f"profile: {text_path}")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path: Path | None = None
    if "throughput" in report:
        png_path = results / f"{stamp}.png"
        title = (f"sessionbridge vs bare aiohttp passthrough"
                 f" ({report['environment']['load_generator']}, {report['environment']['cpus']}"
                 f" CPUs, {stamp})")
        if not chart.draw(report["throughput"], title, png_path):
            print("note: matplotlib is not installed (pip install -e '.[bench]'): no PNG")
            png_path = None
    return json_path, png_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="sessionbridge-bench-"))
    try:
        report = asyncio.run(run(args, workdir))
        report["total_seconds"] = time.monotonic() - started
        print_report(report)
        # Before the work folder goes: the profile's raw files are copied from it.
        json_path, png_path = save(report, args.results)
    finally:
        if args.keep_workdir:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"figures: {json_path}" + (f" and {png_path}" if png_path else ""))
    print(f"total time: {report['total_seconds']:.0f} s")
    if "failures" in report:
        print(f"bench: {len(report['failures'])} part(s) did not run to the end:"
              f" {', '.join(report['failures'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
