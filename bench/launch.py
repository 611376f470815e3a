"""Start a server on a chosen event loop, optionally under cProfile, without touching src/.

    python bench/launch.py [--loop asyncio|uvloop] [--cprofile OUT] [--gc-stats OUT] \
        -m sessionbridge serve ...
    python bench/launch.py [--loop asyncio|uvloop] bench/passthrough.py ...

``--loop uvloop`` sets uvloop's event-loop policy before the program runs, so
its own ``asyncio.run`` (the bridge's ``serve``) or ``web.run_app`` (the
passthrough) makes a uvloop loop; ``asyncio`` leaves the default loop.

``--without PART[,PART]`` takes parts of a turn out of the bridge before it
starts (bench/without.py: ``writes``, ``metrics``), to measure what each costs.

``--cprofile OUT`` makes the process profile itself on signals, so that only
the measured window is profiled (not imports, migrations or shutdown):
SIGUSR1 starts cProfile, SIGUSR2 stops it and writes the statistics to OUT
(pstats format, written to OUT.tmp and renamed, so a reader never sees half a
file). cProfile sees the thread it was started in, the event loop's; the
database threads are left to the sampling profiler (py-spy) and to per-thread
CPU figures.

``--gc-stats OUT`` counts the garbage collector's runs and the CPU time they
take (``gc.callbacks``, a few microseconds a run), per generation, from the
start; on SIGRTMIN+1 the totals so far go to OUT as JSON (with ``dumps``, how
many times it was written, so a reader can wait for a fresh one). SIGRTMIN+3
takes the hook out and puts it back: its clock reads are system calls, where
a sampling profiler often catches a thread that was preempted, so it is out
while py-spy samples.

``--gc-threshold N`` (gen0's threshold; or N,N1,N2) and ``--gc-freeze``
(``gc.freeze()`` on SIGRTMIN+2, sent once the program has imported and set
itself up) try the garbage collector's settings on the program without
changing it: what a turn would save, measured.

The program itself runs as ``python -m`` or ``python script`` would run it:
same ``sys.argv`` and ``__main__``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

LOOPS = ("asyncio", "uvloop")


def use_loop(name: str) -> None:
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif name != "asyncio":
        raise SystemExit(f"launch.py: unknown loop {name!r}; choose from {', '.join(LOOPS)}")


def profile_on_signals(out: Path) -> None:
    import cProfile

    profiler = cProfile.Profile()

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.disable()
        partial = out.with_name(out.name + ".tmp")
        profiler.dump_stats(str(partial))
        os.replace(partial, out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launch.py's own options, the program's argv): the program starts at -m or a script.

    Split by hand rather than by argparse, so none of the program's own options
    (--port, --upstream ...) is ever read as, or abbreviated to, one of ours.
    """
    for index, arg in enumerate(argv):
        if arg == "-m" or not arg.startswith("-"):
            # An option's value (--loop uvloop) does not start the program.
            if index and argv[index - 1] in ("--loop", "--cprofile", "--gc-stats",
                                             "--gc-threshold", "--without"):
                continue
            return argv[:index], argv[index:]
    return argv, []


GC_STATS_SIGNAL = signal.SIGRTMIN + 1
GC_FREEZE_SIGNAL = signal.SIGRTMIN + 2
GC_HOOK_TOGGLE_SIGNAL = signal.SIGRTMIN + 3


def count_collections(out: Path) -> None:
    totals: dict[str, Any] = {"dumps": 0, "collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0],
                              "collected": [0, 0, 0]}
    started = [0.0]

    # The thread's CPU clock, not the wall clock: a callback is Python code, where
    # the thread may hand the GIL to another one (or be preempted) between the
    # collection and the reading, and such waits are not the collector's cost.
    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
            return
        generation = info["generation"]
        totals["collections"][generation] += 1
        totals["seconds"][generation] += time.thread_time() - started[0]
        totals["collected"][generation] += info["collected"]

    def dump(signum: int, frame: FrameType | None) -> None:
        totals["dumps"] += 1
        partial = out.with_name(out.name + ".tmp")
        # Counting the tracked objects takes a few milliseconds; the bench asks
        # only before and after a measured run, never during one.
        partial.write_text(json.dumps({**totals, "threshold": gc.get_threshold(),
                                       "tracked": len(gc.get_objects()),
                                       "frozen": gc.get_freeze_count()}))
        os.replace(partial, out)

    def toggle(signum: int, frame: FrameType | None) -> None:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
        else:
            gc.callbacks.append(callback)

    gc.callbacks.append(callback)
    signal.signal(GC_STATS_SIGNAL, dump)
    signal.signal(GC_HOOK_TOGGLE_SIGNAL, toggle)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="bench/launch.py", description=__doc__.split("\n\n")[0],
        usage="%(prog)s [--loop LOOP] [--cprofile OUT] [--gc-stats OUT] [--gc-threshold N]"
        " [--gc-freeze] [--without PART,...] (-m MODULE | SCRIPT) [ARGS ...]",
    )
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("--cprofile", type=Path, metavar="OUT")
    parser.add_argument("--gc-stats", type=Path, metavar="OUT")
    parser.add_argument("--gc-threshold", metavar="N[,N1,N2]")
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument("--without", metavar="PART,...")
    own, program = split_argv(sys.argv[1:])
    args = parser.parse_args(own)
    if not program or program == ["-m"]:
        parser.error("name a module (-m MODULE) or a script")
    use_loop(args.loop)
    if args.cprofile:
        profile_on_signals(args.cprofile)
    if args.gc_stats:
        count_collections(args.gc_stats)
    if args.gc_threshold:
        thresholds = [int(part) for part in args.gc_threshold.split(",")]
        gc.set_threshold(*thresholds, *gc.get_threshold()[len(thresholds):])
    if args.gc_freeze:
        signal.signal(GC_FREEZE_SIGNAL, lambda signum, frame: gc.freeze())
    if args.without:
        from without import take_out

        take_out(args.without)
    if program[0] == "-m":
        module, *rest = program[1:]
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, *rest = program
        sys.argv = [script, *rest]
        # As `python script` does: the script's folder first on the path.
        sys.path[0] = str(Path(script).resolve().parent)
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
