"""The profile part: where a bridge turn's CPU goes, read from profiles of a 32-connection run.

One bridge (on the plan's profile loop), the reference AI server with no
delay, wrk at 32 connections over the throughput part's sessions, three runs
of the same length on the same bridge:

1. timed: no profiler; messages/s and CPU per turn (whole process and the
   event loop's thread) as every other part measures them;
2. py-spy: ``py-spy record --format raw --threads`` (with ``--native
   --idle`` by default) samples every thread of the bridge from outside.
   Each sample is read here as on-CPU or waiting (in epoll, on a lock or
   queue, for the GIL) from its native frames, so the shares are of CPU, and
   the CPU seconds it saw are checked against /proc's for each thread. The
   bridge's threads run at a raised priority meanwhile (``favoured``), so
   that few samples catch a thread runnable but waiting for a core;
3. cProfile: the bridge was started by bench/launch.py with ``--cprofile``,
   so SIGUSR1/SIGUSR2 profile just this run's window, deterministically, on
   the event loop's thread: calls per turn of every function (favoured too:
   cProfile's clock is the wall clock).

4. strace, when installed: ``strace -c -f`` counts the bridge's system calls
   (every thread) over a fourth run, per turn. strace slows the process many
   times over, so only its counts are read, never its times: at one client
   they show what each SQLite commit asks of the kernel (two ``pwrite`` a
   WAL frame, the WAL index's ``fcntl`` locks).

The timed run also counts the garbage collector's runs and CPU (launch.py's
``--gc-stats``); its hook is taken out during the two profiled runs.

Profilers slow what they watch (py-spy takes CPU from the same two cores and
pauses the process to read it; cProfile roughly doubles the loop thread's
CPU), so each run's own messages/s and CPU per turn are printed beside it, and
only the timed run's figures are the bridge's. The tables are written to
``bench/results/<stamp>-profile.txt``, the raw samples and the pstats file
beside it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import pstats
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen import LoadResult, write_paths, write_response_requests
from phases import Context, fresh_bridge, measured_run, ready_conversations, ready_sessions
from procs import Server, cpu_seconds

TOP = 25
PACKAGE = "sessionbridge/"
PROFILER_START_DEADLINE = 15.0
PROFILER_STOP_DEADLINE = 120.0
CPROFILE_WRITE_DEADLINE = 60.0
GC_STATS_DEADLINE = 10.0
GC_STATS_SIGNAL = signal.SIGRTMIN + 1  # as bench/launch.py
GC_FREEZE_SIGNAL = signal.SIGRTMIN + 2  # as bench/launch.py
GC_HOOK_TOGGLE_SIGNAL = signal.SIGRTMIN + 3  # as bench/launch.py


def pyspy_path() -> str | None:
    """py-spy from this environment's bin folder (the bench extra), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


# -- reading py-spy's raw samples ---------------------------------------------------------------

# Native frames under which a thread is waiting, not computing. With --idle
# py-spy reports every thread at every tick; these tell the waiting ones.
_POLL = ("epoll_wait", "epoll_pwait", "select_epoll_poll", "poll", "ppoll", "uv__io_poll")
_LOCK = ("PyThread_acquire_lock_timed", "sem_wait", "sem_timedwait", "sem_clockwait",
         "pthread_cond_wait", "lock_PyThread_acquire_lock", "acquire_timed")
_GIL = ("take_gil", "pthread_cond_timedwait")
_SLEEP = ("nanosleep", "clock_nanosleep", "select")
# Waiting for the disk: the writer's commits (WAL) and checkpoints.
_IO = ("fdatasync", "fsync")
# Without --native the leaf is a Python frame; these are the waiting ones.
_PY_IDLE_LEAVES = ("EpollSelector.select", "BaseSelector.select", "SimpleQueue.get",
                   "Condition.wait", "Event.wait", "Thread.join")


@dataclass(frozen=True)
class Frame:
    name: str
    file: str

    @property
    def python(self) -> bool:
        return self.file.endswith(".py") or self.file.startswith("<")

    def __str__(self) -> str:
        return f"{self.name} ({self.file})"


def parse_frame(text: str) -> Frame:
    name, _, rest = text.rpartition(" (")
    if not name:
        return Frame(text, "?")
    return Frame(name, rest.rstrip(")"))


@dataclass
class Sample:
    tid: int
    thread: str
    frames: list[Frame]  # root first
    count: int

    def native_tail(self) -> list[Frame]:
        """The native frames below the innermost Python frame (leaf first)."""
        tail = []
        for frame in reversed(self.frames):
            if frame.python:
                break
            tail.append(frame)
        return tail

    def python_leaf(self) -> Frame | None:
        return next((frame for frame in reversed(self.frames) if frame.python), None)

    def state(self, native: bool) -> str:
        """"cpu", or what the thread waits in: "poll", "lock", "gil", "sleep", "io"."""
        if not native:
            leaf = self.python_leaf()
            return "poll" if leaf and leaf.name in _PY_IDLE_LEAVES else "cpu"
        names = [frame.name for frame in self.native_tail()]
        if not names:
            return "cpu"
        for state, markers in (("poll", _POLL), ("lock", _LOCK), ("gil", _GIL),
                               ("sleep", _SLEEP), ("io", _IO)):
            if any(name in markers for name in names):
                return state
        return "cpu"


_THREAD = re.compile(r"thread \((\d+)\)(?::\s*(.*))?")


def parse_raw(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        match = _THREAD.fullmatch(parts[0])
        if match:
            tid, thread = int(match.group(1)), match.group(2) or match.group(1)
            parts = parts[1:]
        else:
            tid, thread = 0, "?"
        samples.append(Sample(tid, thread, [parse_frame(part) for part in parts], int(count)))
    return samples


def short_file(path: str) -> str:
    """A module's path from its package on (sessionbridge/conversation.py, asyncio/events.py)."""
    at = path.rfind("/" + PACKAGE)
    if at >= 0:
        return path[at + 1:]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    if "/lib/python3." in path:
        rest = path.split("/lib/python3.", 1)[1]
        return rest.split("/", 1)[1] if "/" in rest else rest
    return path


def _is_gc_callback(frame: Frame) -> bool:
    # launch.py's gc.callbacks hook (--gc-stats): it runs only inside a
    # collection, and with C frames the sampler often stops the thread in its
    # clock read rather than in the collector's own (static, inlined) functions.
    return frame.file.endswith("launch.py") and "count_collections" in frame.name


def component(sample: Sample) -> str:
    """Who the CPU of a sample is for: the innermost Python frame's library (the GC apart)."""
    if any(frame.name in ("gc_collect_main", "gc_collect_with_callback") for frame in
           sample.frames) or any(_is_gc_callback(frame) for frame in sample.frames):
        return "the garbage collector"
    leaf = sample.python_leaf()
    if leaf is None:
        return "native, no Python frame"
    path = short_file(leaf.file)
    if path.startswith(PACKAGE):
        return path.removesuffix(".py").replace("/", ".")
    top = path.split("/", 1)[0].removesuffix(".py")
    return {
        "selectors": "asyncio", "threading": "threads", "queue": "threads",
        "concurrent": "threads", "<string>": "generated __init__ (dataclasses)",
        "json": "json (stdlib)",
    }.get(top, top)


# Cross-cutting concerns, counted inclusively: a sample counts when any frame
# of its stack matches.
def _any(*needles: str) -> Any:
    def match(sample: Sample) -> bool:
        return any(needle in str(frame) for frame in sample.frames for needle in needles)
    return match


CONCERNS: list[tuple[str, Any]] = [
    ("aiohttp client: the call to the AI server (ClientSession._request and below)",
     _any("ClientSession._request")),
    ("aiohttp server: parsing requests, writing responses (web_protocol.py, own frames)",
     lambda s: (leaf := s.python_leaf()) is not None and "aiohttp/" in leaf.file
     and "client" not in leaf.file and "connector" not in leaf.file),
    ("the package's own frames (sessionbridge/*, leaf)",
     lambda s: (leaf := s.python_leaf()) is not None and PACKAGE in leaf.file),
    ("SQLite work (sqlite3 calls and the store's write ops, any thread)",
     _any("pysqlite", "libsqlite3", "sqlite3_")),
    ("aiosqlite reads: hand-off to and from its threads", _any("aiosqlite/")),
    ("group-commit writer: hand-off (queue put, call_soon_threadsafe, _deliver)",
     _any("GroupCommitWriter._send_next", "GroupCommitWriter._deliver",
          "call_soon_threadsafe", "_write_to_self", "_read_from_self")),
    ("json (orjson, json, sessionbridge/jsoncodec.py)", _any("orjson", "json/", "jsoncodec")),
    ("logging", _any("logging/")),
    ("prometheus_client", _any("prometheus_client/")),
    ("task creation (create_task, Task init)",
     _any("create_task", "_asyncio_Task___init__", "task_new")),
    ("futures (create_future, set_result, wakeups)",
     _any("create_future", "future_set_result", "Future.set_result", "future_schedule_callbacks")),
    ("socket system calls (send, recv, epoll_ctl ...)",
     lambda s: bool(s.native_tail()) and s.native_tail()[0].name in
     ("send", "sendmsg", "recv", "recvfrom", "recvmsg", "read", "write", "writev", "epoll_ctl",
      "__libc_send", "__libc_recv", "accept4", "connect", "close", "shutdown")),
    ("the garbage collector (and launch.py's gc.callbacks hook)",
     lambda s: any(f.name == "gc_collect_main" or _is_gc_callback(f) for f in s.frames)),
    ("dataclass __init__ (generated <string> code)", _any("__create_fn__")),
]


def analyse_pyspy(
    samples: list[Sample], native: bool, rate: float, turns: int,
    proc_cpu: dict[int, float], proc_delay: dict[int, float] | None = None,
) -> tuple[dict[str, Any], str]:
    """Tables of the py-spy samples: (figures for the JSON, the text).

    A sample read as on-CPU may be of a thread that was runnable but waiting
    for a core (two cores, four busy processes), so py-spy's count of CPU
    samples overstates CPU time. The samples therefore give only the shares
    within each thread; each thread's CPU time for the window comes from
    /proc, and a sample of thread T weighs T's CPU seconds / T's CPU samples.
    """
    per = max(turns, 1)
    cpu = [s for s in samples if s.state(native) == "cpu"]
    cpu_samples: collections.Counter[int] = collections.Counter()
    for s in cpu:
        cpu_samples[s.tid] += s.count
    weight = {tid: proc_cpu[tid] / count if proc_cpu.get(tid) else 1.0 / rate
              for tid, count in cpu_samples.items()}
    total_s = sum(weight[s.tid] * s.count for s in cpu) or 1.0

    def row(seconds: float) -> str:
        return f"{100 * seconds / total_s:6.1f}% {seconds * 1e6 / per:7.1f} µs"

    lines: list[str] = []
    out: dict[str, Any] = {"cpu_samples": sum(cpu_samples.values()), "rate": rate,
                           "turns": turns, "cpu_seconds": total_s}

    # Threads: py-spy's on-CPU samples against /proc's CPU time for the window.
    threads: dict[int, dict[str, Any]] = {}
    for s in samples:
        entry = threads.setdefault(s.tid, {"name": s.thread, "states": collections.Counter()})
        entry["states"][s.state(native)] += s.count
    lines.append(f"By thread: CPU per turn from /proc over {turns:,} turns, time runnable"
                 f" but without a core (schedstat); py-spy's samples at {rate:.0f} Hz, read as"
                 " on CPU or waiting (in epoll, on a lock or queue, for the GIL)")
    delay = proc_delay or {}
    lines.append(f"  {'thread':<38}{'/proc CPU':>17}{'no core µs':>11}{'samples on CPU':>16}"
                 "  waiting samples")
    for tid, entry in sorted(threads.items(), key=lambda kv: -proc_cpu.get(kv[0], 0.0)):
        states = entry["states"]
        waits = ", ".join(f"{k} {v}" for k, v in states.most_common() if k != "cpu")
        lines.append(f"  {entry['name'][:36]:<38}{row(proc_cpu.get(tid, 0.0)):>17}"
                     f"{delay.get(tid, 0.0) * 1e6 / per:11.1f}{states['cpu']:>16}  {waits}")
        entry["states"] = dict(states)
        entry["proc_cpu_us_per_turn"] = proc_cpu.get(tid, 0.0) * 1e6 / per
    out["threads"] = {str(tid): entry for tid, entry in threads.items()}
    seen = sum(cpu_samples.values()) / rate
    kernel = sum(proc_cpu.values())
    lines.append(f"  py-spy's CPU samples stand for {seen:.2f} s, /proc counted {kernel:.2f} s of"
                 " CPU (samples of a thread runnable but off a core count as busy; so the"
                 " tables below take each thread's CPU time from /proc and only the shares"
                 " within a thread from the samples).")
    lines.append("  Such a wait counts at the frame the thread was preempted in, and a thread"
                 " that wakes another (a send on loopback, SimpleQueue.put's sem_post) is often"
                 " preempted right there: those frames are overstated; the kernel (system)"
                 " CPU per turn in the runs above is the unbiased figure for system calls.")
    lines.append("")

    def table(title: str, counter: collections.Counter[str], limit: int = TOP) -> None:
        lines.append(title)
        for key, seconds in counter.most_common(limit):
            lines.append(f"  {row(seconds)}  {key}")
        lines.append("")

    by_component: collections.Counter[str] = collections.Counter()
    own_python: collections.Counter[str] = collections.Counter()
    own_native: collections.Counter[str] = collections.Counter()
    package_cumulative: collections.Counter[str] = collections.Counter()
    concerns: collections.Counter[str] = collections.Counter()
    for s in cpu:
        seconds = weight[s.tid] * s.count
        by_component[component(s)] += seconds
        leaf = s.python_leaf()
        if leaf is not None:
            own_python[f"{leaf.name} ({short_file(leaf.file)})"] += seconds
        if s.frames:
            native_leaf = s.frames[-1]
            own_native[f"{native_leaf.name} ({short_file(native_leaf.file)})"] += seconds
        in_package = {f"{f.name} ({short_file(f.file)})" for f in s.frames
                      if f.python and PACKAGE in f.file
                      and f.name not in ("<module>", "main", "_run")}
        for key in in_package:
            package_cumulative[key] += seconds
        for name, match in CONCERNS:
            if match(s):
                concerns[name] += seconds

    table("CPU by component (the innermost Python frame's module; a C call counts for its"
          " Python caller)", by_component, limit=40)
    lines.append("Cross-cutting (a sample counts when any frame of its stack matches;"
                 " rows overlap)")
    for name, _ in CONCERNS:
        lines.append(f"  {row(concerns[name])}  {name}")
    lines.append("")
    table(f"Top {TOP} frames by own time (Python level: a C call counts for its Python caller)",
          own_python)
    if native:
        table(f"Top {TOP} frames by own time (native level: the leaf, C included)", own_native)
    table(f"Top {TOP} of the package's functions by cumulative time", package_cumulative)

    def us(counter: collections.Counter[str], limit: int | None = TOP) -> dict[str, float]:
        return {key: seconds * 1e6 / per for key, seconds in counter.most_common(limit)}

    out.update({
        "us_per_turn_by_component": us(by_component, None),
        "us_per_turn_by_concern": us(concerns, None),
        "own_python_us_per_turn": us(own_python),
        "own_native_us_per_turn": us(own_native) if native else None,
        "package_cumulative_us_per_turn": us(package_cumulative),
    })
    return out, "\n".join(lines)


# -- reading cProfile's statistics ---------------------------------------------------------------

Key = tuple[str, int, str]  # pstats' (file, line, function); file "~" for a built-in


def _builtin(*names: str) -> Any:
    return lambda key: key[0] == "~" and any(name in key[2] for name in names)


def _python(file: str, *functions: str) -> Any:
    return lambda key: key[0].endswith(file) and key[2] in functions


# Calls per turn that tell how a turn is built. asyncio's loop methods are
# Python code on the default loop and built-ins on uvloop; both are counted.
COUNTED_CALLS: list[tuple[str, Any]] = [
    ("tasks created (loop.create_task)",
     lambda k: _python("asyncio/base_events.py", "create_task")(k)
     or _builtin("'create_task' of 'uvloop")(k)),
    ("futures created (loop.create_future)",
     lambda k: _python("asyncio/base_events.py", "create_future")(k)
     or _builtin("'create_future' of 'uvloop")(k)),
    ("callbacks scheduled (loop.call_soon)",
     lambda k: _python("asyncio/base_events.py", "call_soon")(k)
     or _builtin("'call_soon' of 'uvloop")(k)),
    ("timers set (loop.call_at, call_later's too)",
     lambda k: _python("asyncio/base_events.py", "call_at")(k)
     or _builtin("'call_at' of 'uvloop", "'call_later' of 'uvloop")(k)),
    ("timers cancelled (TimerHandle.cancel)", _python("asyncio/events.py", "cancel")),
    ("loop iterations (epoll waits)",
     lambda k: _builtin("'poll' of 'select.epoll'")(k)),
    ("hand-offs to the writer thread (SimpleQueue.put)", _builtin("'put' of '_queue.SimpleQueue")),
    ("batches back from it (GroupCommitWriter._deliver; its call_soon_threadsafe is made"
     " on the writer thread, which cProfile does not see)",
     _python("store/group_commit.py", "_deliver")),
    ("aiosqlite requests (a hop to its thread and back)", _python("aiosqlite/core.py", "_execute")),
    ("socket send", _builtin("'send' of '_socket.socket'")),
    ("socket recv", _builtin("'recv' of '_socket.socket'", "'recv_into' of '_socket.socket'")),
    ("orjson.dumps", _builtin("orjson.dumps")),
    ("orjson.loads", _builtin("orjson.loads")),
    ("json (stdlib) dumps/loads", _python("json/__init__.py", "dumps", "loads")),
    ("logging: Logger methods", lambda k: k[0].endswith("logging/__init__.py")
     and k[2] in ("debug", "info", "warning", "error", "exception", "log", "isEnabledFor")),
    ("prometheus_client: inc/observe/set/labels",
     lambda k: "prometheus_client/" in k[0] and k[2] in ("inc", "observe", "set", "labels",
                                                          "dec")),
    ("prometheus_client: all its functions", lambda k: "prometheus_client/" in k[0]),
    ("contextvars Context.run (one per callback run)", _builtin("'run' of '_contextvars.Context")),
    ("clock reads (time.monotonic/time/perf_counter, loop.time)",
     lambda k: _builtin("time.monotonic", "time.time", "time.perf_counter")(k)
     or _python("asyncio/base_events.py", "time")(k)),
    ("dataclass instances (generated __init__)",
     lambda k: k[0] == "<string>" and k[2] == "__init__"),
]
# Built-ins that wait rather than compute; left out of the profiled total.
WAITING = ("'poll' of 'select.epoll'", "'run' of 'uvloop.loop.Loop'")


def _label(key: Key) -> str:
    path, line, name = key
    if path == "~":
        return name  # a built-in: <method 'x' of 'y' objects>
    return f"{name} ({short_file(path)}:{line})"


def analyse_cprofile(path: Path, turns: int) -> tuple[dict[str, Any], str]:
    stats = pstats.Stats(str(path))
    raw: dict[Key, tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    per = max(turns, 1)
    waiting = sum(v[2] for k, v in raw.items() if _builtin(*WAITING)(k))
    total_tt = sum(v[2] for v in raw.values()) - waiting
    all_calls = sum(v[1] for v in raw.values())
    lines = [
        f"cProfile of the event loop's thread over {turns:,} turns:"
        f" {total_tt * 1e6 / per:.0f} µs of profiled time per turn, not counting"
        f" {waiting * 1e6 / per:.0f} µs waiting in epoll; {all_calls / per:.0f} function calls"
        " per turn. cProfile's own cost is in every time here: read the shares and the"
        " call counts, not the absolute times. A coroutine's \"call\" is each time it"
        " resumes, so its calls/turn is its awaits that suspended, plus one.",
        "",
    ]

    def header(title: str) -> None:
        lines.append(title)
        lines.append(f"  {'calls/turn':>10} {'own µs':>8} {'own %':>6} {'cum µs':>8}  function")

    def entry(key: Key) -> str:
        _, nc, tt, ct, _ = raw[key]
        return (f"  {nc / per:10.2f} {tt * 1e6 / per:8.1f} {100 * tt / total_tt:6.1f}"
                f" {ct * 1e6 / per:8.1f}  {_label(key)}")

    by_own = sorted((k for k in raw if not _builtin(*WAITING)(k)), key=lambda k: -raw[k][2])
    header(f"Top {TOP} functions by own time (epoll's wait left out)")
    lines.extend(entry(key) for key in by_own[:TOP])
    lines.append("")
    package = [k for k in raw if PACKAGE in k[0] and k[2] not in ("<module>", "main", "_run")]
    by_cum = sorted(package, key=lambda k: -raw[k][3])
    header(f"Top {TOP} of the package's functions by cumulative time")
    lines.extend(entry(key) for key in by_cum[:TOP])
    lines.append("")
    own_by_file: collections.Counter[str] = collections.Counter()
    for key, value in raw.items():
        if not _builtin(*WAITING)(key):
            own_by_file[short_file(key[0]) if key[0] != "~" else "built-ins (C)"] += value[2]
    lines.append("Own time by module (top 20; built-ins are C functions: socket calls, orjson ...)")
    for name, tt in own_by_file.most_common(20):
        lines.append(f"  {100 * tt / total_tt:6.1f}% {tt * 1e6 / per:8.1f} µs  {name}")
    lines.append("")
    counted: dict[str, float] = {"function calls": all_calls / per}
    lines.append("Calls per turn")
    for name, match in COUNTED_CALLS:
        calls = sum(value[1] for key, value in raw.items() if match(key))
        counted[name] = calls / per
        lines.append(f"  {calls / per:10.2f}  {name}")
    lines.append("")
    out = {
        "turns": turns,
        "profiled_us_per_turn": total_tt * 1e6 / per,
        "calls_per_turn": counted,
        "own_us_per_turn": {_label(k): raw[k][2] * 1e6 / per for k in by_own[:TOP]},
        "package_cumulative_us_per_turn": {_label(k): raw[k][3] * 1e6 / per
                                           for k in by_cum[:TOP]},
    }
    return out, "\n".join(lines)


# -- running ----------------------------------------------------------------------------------


def run_delay(pid: int) -> dict[int, float]:
    """Seconds each thread has spent runnable but waiting for a core (/proc schedstat)."""
    seconds: dict[int, float] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with (contextlib.suppress(FileNotFoundError, IndexError, ValueError),
              open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as schedstat):
            seconds[int(task)] = int(schedstat.read().split()[1]) / 1e9
    return seconds


@contextlib.contextmanager
def favoured(pid: int, nice: int) -> Iterator[bool]:
    """Every thread of ``pid`` at niceness ``nice`` meanwhile (root only); whether it took.

    A sampler cannot tell a thread on a core from one that is runnable and
    waiting for one: both look busy, at whatever frame the thread was
    preempted in (most often a system call that woke another process). On
    two cores shared with wrk, the AI server, py-spy and whatever else runs,
    that waiting is a large part of the samples; favouring the bridge while
    it is sampled makes it small, so the samples are of CPU. The bridge's own
    work per turn does not change with its priority.
    """
    tids = [int(task) for task in os.listdir(f"/proc/{pid}/task")]
    changed: list[tuple[int, int]] = []
    took = True
    # With autogroups (kernel.sched_autogroup_enabled) a niceness counts only
    # against the processes of the bridge's own session (wrk, the AI server,
    # py-spy); other sessions' processes get the CPU by their group's weight,
    # which /proc/PID/autogroup sets for the bench's session as a whole.
    autogroup = Path(f"/proc/{pid}/autogroup")
    group_before: str | None = None
    try:
        for tid in tids:
            before = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            changed.append((tid, before))
        with contextlib.suppress(FileNotFoundError):
            group_before = autogroup.read_text().split("nice")[-1].strip()
            autogroup.write_text(str(nice))
    except PermissionError:
        took = False
    try:
        yield took
    finally:
        for tid, before in changed:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, before)
        if group_before is not None:
            with contextlib.suppress(OSError):
                autogroup.write_text(group_before)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process so far."""
    seconds: dict[int, float] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            seconds[int(task)] = cpu_seconds(pid, int(task))
    return seconds


async def gc_totals(server: Server, path: Path) -> dict[str, Any]:
    """The garbage collector's totals so far, asked of a bridge started with --gc-stats."""
    before = json.loads(path.read_text())["dumps"] if path.exists() else 0
    os.kill(server.pid, GC_STATS_SIGNAL)
    deadline = time.monotonic() + GC_STATS_DEADLINE
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            totals: dict[str, Any] = json.loads(path.read_text())
            if totals["dumps"] > before:
                return totals
        await asyncio.sleep(0.02)
    raise RuntimeError("the bridge wrote no garbage-collector figures")


def gc_delta(before: dict[str, Any], after: dict[str, Any], turns: int) -> dict[str, Any]:
    per = max(turns, 1)
    return {
        "collections_per_1000_turns": [1000 * (a - b) / per for a, b in
                                       zip(after["collections"], before["collections"],
                                           strict=True)],
        "us_per_turn": [1e6 * (a - b) / per for a, b in
                        zip(after["seconds"], before["seconds"], strict=True)],
        "us_per_collection": [1e6 * (a - b) / (c - d) if c > d else 0.0 for a, b, c, d in
                              zip(after["seconds"], before["seconds"], after["collections"],
                                  before["collections"], strict=True)],
        "collected_per_collection": [(a - b) / (c - d) if c > d else 0.0 for a, b, c, d in
                                     zip(after["collected"], before["collected"],
                                         after["collections"], before["collections"],
                                         strict=True)],
        "threshold": after["threshold"],
        "tracked_objects": after["tracked"],
        "frozen_objects": after["frozen"],
    }


@dataclass
class Window:
    """One profiled or timed run: its load figures, per-thread CPU and garbage collections."""

    result: LoadResult
    thread_cpu: dict[int, float] = field(default_factory=dict)
    gc: dict[str, Any] | None = None
    # Per thread: seconds runnable but not on a core, during the run.
    run_delay: dict[int, float] = field(default_factory=dict)

    @property
    def waiting_for_core_ms(self) -> float:
        return sum(self.run_delay.values()) * 1000 / max(self.result.requests, 1)

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {"rps": r.rps, "requests": r.requests, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                "cpu_ms_per_turn": r.server_cpu_ms, "loop_thread_cpu_ms_per_turn":
                r.server_main_cpu_ms, "kernel_cpu_ms_per_turn": r.server_sys_cpu_ms,
                "switches_per_turn": r.server_switches,
                "errors": r.http_errors + r.socket_errors, "gc": self.gc,
                "waiting_for_a_core_ms_per_turn": self.waiting_for_core_ms}


async def _window(
    ctx: Context, bridge: Server, ai: Server, paths: Path, token: str, gc_path: Path | None,
    bodies: Path | None = None,
) -> Window:
    """One measured run; the collector's figures too unless ``gc_path`` is None."""
    gc_before = await gc_totals(bridge, gc_path) if gc_path else None
    before, delay_before = thread_cpu(bridge.pid), run_delay(bridge.pid)
    result = await measured_run(ctx, bridge, ai, paths, token,
                                ctx.plan.profile_connections,
                                ctx.plan.profile_duration, bodies)
    after, delay_after = thread_cpu(bridge.pid), run_delay(bridge.pid)
    gc_after = await gc_totals(bridge, gc_path) if gc_path else None
    return Window(result, {tid: after[tid] - before.get(tid, 0.0) for tid in after},
                  gc_delta(gc_before, gc_after, result.requests) if gc_before and gc_after
                  else None,
                  {tid: delay_after[tid] - delay_before.get(tid, 0.0) for tid in delay_after})


async def _pyspy_window(
    ctx: Context, bridge: Server, ai: Server, paths: Path, token: str, pyspy: str, out: Path,
    bodies: Path | None = None,
) -> Window:
    plan = ctx.plan
    argv = [pyspy, "record", "--pid", str(bridge.pid), "--format", "raw", "--output", str(out),
            "--rate", str(plan.profile_rate), "--threads", "--nolineno"]
    if plan.profile_native:
        argv += ["--native", "--idle"]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert process.stdout is not None
    said: list[str] = []
    try:
        # Sampling has started once py-spy says so; only then does the load start.
        async with asyncio.timeout(PROFILER_START_DEADLINE):
            while True:
                line = (await process.stdout.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError(f"py-spy exited: {''.join(said)}")
                said.append(line)
                if "Sampling process" in line:
                    break
        reader = asyncio.create_task(process.stdout.read())
        # The collector's hook is out meanwhile (launch.py): a thread preempted in
        # its clock reads would be sampled there.
        os.kill(bridge.pid, GC_HOOK_TOGGLE_SIGNAL)
        try:
            with favoured(bridge.pid, plan.profile_nice) as took:
                if not took:
                    print("  note: could not raise the bridge's priority (not root): the"
                          " samples include more time spent waiting for a core", flush=True)
                window = await _window(ctx, bridge, ai, paths, token, None, bodies)
        finally:
            os.kill(bridge.pid, GC_HOOK_TOGGLE_SIGNAL)
        process.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        async with asyncio.timeout(PROFILER_STOP_DEADLINE):
            said.append((await reader).decode(errors="replace"))
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no samples: {''.join(said)[-2000:]}")
    return window


async def _cprofile_window(
    ctx: Context, bridge: Server, ai: Server, paths: Path, token: str, out: Path,
    bodies: Path | None = None,
) -> Window:
    # cProfile times with the wall clock, so a thread preempted in a system call
    # (a send that woke the AI server, a queue put that woke the writer) books
    # the wait on that call: the bridge is favoured meanwhile, as under py-spy,
    # and the collector's hook is out (its clock reads are system calls too).
    os.kill(bridge.pid, GC_HOOK_TOGGLE_SIGNAL)
    os.kill(bridge.pid, signal.SIGUSR1)
    await asyncio.sleep(0.2)  # the signal is handled at the loop's next Python instruction
    try:
        with favoured(bridge.pid, ctx.plan.profile_nice):
            window = await _window(ctx, bridge, ai, paths, token, None, bodies)
    finally:
        os.kill(bridge.pid, signal.SIGUSR2)
        os.kill(bridge.pid, GC_HOOK_TOGGLE_SIGNAL)
    deadline = time.monotonic() + CPROFILE_WRITE_DEADLINE
    while not out.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the bridge wrote no cProfile statistics")
        await asyncio.sleep(0.1)
    return window


def strace_path() -> str | None:
    return shutil.which("strace")


def parse_strace_counts(text: str) -> dict[str, int]:
    """``strace -c``'s table as {system call: calls}, the total row left out."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(parts) in (5, 6) and parts[3].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


async def _strace_window(
    ctx: Context, bridge: Server, ai: Server, paths: Path, token: str, strace: str, out: Path,
    bodies: Path | None = None,
) -> Window:
    process = await asyncio.create_subprocess_exec(
        strace, "-c", "-f", "-p", str(bridge.pid), "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        # Attached once strace says so for the process (then for each thread).
        async with asyncio.timeout(PROFILER_START_DEADLINE):
            while b"attached" not in (line := await process.stderr.readline()):
                if not line:  # no ptrace rights over the bridge, say
                    raise RuntimeError("strace exited before attaching")
        window = await _window(ctx, bridge, ai, paths, token, None, bodies)
        process.send_signal(signal.SIGINT)  # strace detaches and writes its table
        async with asyncio.timeout(PROFILER_STOP_DEADLINE):
            await process.stderr.read()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return window


async def _strace_section(
    ctx: Context, bridge: Server, ai: Server, paths: Path, token: str, bodies: Path | None,
) -> tuple[Window, dict[str, int]] | str:
    """The strace run and its counts, or why there are none."""
    strace = strace_path()
    if strace is None:
        return "strace is not installed (apt-get install strace): no system-call counts"
    out = ctx.workdir / "bridge-strace.txt"
    try:
        window = await _strace_window(ctx, bridge, ai, paths, token, strace, out, bodies)
    except (RuntimeError, TimeoutError) as exc:
        return f"strace could not count the bridge's system calls: {exc}"
    return window, parse_strace_counts(out.read_text(errors="replace"))


def strace_text(counts: dict[str, int], turns: int) -> str:
    total = sum(counts.values())
    rows = [f"System calls per turn over {turns:,} turns (every thread; the counts only,"
            f" strace's own slowing makes its times meaningless): {total / max(turns, 1):.1f}"]
    for name, calls in sorted(counts.items(), key=lambda kv: -kv[1])[:12]:
        rows.append(f"  {calls / max(turns, 1):8.2f}  {name}")
    return "\n".join(rows) + "\n"


def _window_line(name: str, window: Window) -> str:
    r = window.result
    line = (f"  {name:<20}{r.rps:6.0f} msg/s  p50 {r.p50_ms:6.2f} ms  CPU/turn"
            f" {r.server_cpu_ms:.3f} ms (loop thread {r.server_main_cpu_ms:.3f},"
            f" kernel {r.server_sys_cpu_ms:.3f})"
            f"  switches/turn {r.server_switches:.1f}"
            f"  waiting for a core {window.waiting_for_core_ms:.3f} ms/turn")
    if window.gc:
        line += f"  GC {sum(window.gc['us_per_turn']):.0f} µs/turn"
    return line + f"  errors {r.http_errors + r.socket_errors}"


def _gc_text(window: Window) -> str:
    gc = window.gc
    if not gc:
        return ""
    rows = [f"Garbage collector in the timed run (gc.callbacks, the thread's CPU time; threshold"
            f" {gc['threshold']}; {gc['tracked_objects']:,} objects tracked,"
            f" {gc['frozen_objects']:,} frozen)",
            f"  {'generation':<12}{'runs/1000 turns':>16}{'µs/run':>9}{'µs/turn':>9}"
            f"{'freed/run':>11}"]
    for generation in range(3):
        rows.append(f"  {generation:<12}{gc['collections_per_1000_turns'][generation]:16.1f}"
                    f"{gc['us_per_collection'][generation]:9.0f}"
                    f"{gc['us_per_turn'][generation]:9.1f}"
                    f"{gc['collected_per_collection'][generation]:11.0f}")
    rows.append(f"  {'all':<12}{'':>16}{'':>9}{sum(gc['us_per_turn']):9.1f}")
    return "\n".join(rows) + "\n"


async def phase(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    loop = plan.profile_loop
    pyspy = pyspy_path()
    pstats_path = ctx.workdir / "bridge-profile.pstats"
    gc_path = ctx.workdir / "bridge-profile-gc.json"
    ai = ctx.procs.devserver("ai-profile", delay=0)
    gc_options: list[str] = []
    if plan.profile_gc_threshold:
        gc_options += ["--gc-threshold", plan.profile_gc_threshold]
    if plan.profile_gc_freeze:
        gc_options += ["--gc-freeze"]
    bridge, token = fresh_bridge(ctx, "bridge-profile", ai, loop=loop, gc_stats=gc_path,
                                 cprofile=pstats_path if plan.profile_cprofile else None,
                                 launch_options=gc_options)
    face = plan.profile_face
    bodies: Path | None = None
    if face == "responses":
        conversation_ids, _ = await ready_conversations(bridge, token, plan.sessions)
        paths, bodies = write_response_requests(
            ctx.workdir / "profile-paths.txt", ctx.workdir / "profile-bodies.txt",
            conversation_ids,
        )
    else:
        session_ids, _ = await ready_sessions(bridge, token, plan.sessions)
        paths = write_paths(ctx.workdir / "profile-paths.txt", session_ids)
    await ctx.load.run(bridge.url, paths, token, plan.profile_connections, plan.warmup,
                        bodies_file=bodies)
    if plan.profile_gc_freeze:
        # Once the sessions are made and warmed, as a bridge's start-up would
        # end with gc.freeze(): what is alive now is never collected again.
        os.kill(bridge.pid, GC_FREEZE_SIGNAL)
        await asyncio.sleep(0.2)

    turns = (f"{plan.sessions} sessions" if face != "responses"
             else f"POST /v1/responses in {plan.sessions} conversations")
    header = (f"Profile of the bridge ({loop} loop) at {plan.profile_connections} connections,"
              " wrk,"
              f" {turns}, AI server with no delay,"
              f" {plan.profile_duration:.0f} s per run")
    if gc_options:
        header += f"; garbage collector changed for a trial: {' '.join(gc_options)}"
    result: dict[str, Any] = {"loop": loop, "face": face, "connections": plan.profile_connections,
                              "duration_s": plan.profile_duration, "gc_options": gc_options}
    timed = await _window(ctx, bridge, ai, paths, token, gc_path, bodies)
    result["timed"] = timed.summary()
    print(_window_line("timed (no profiler)", timed), flush=True)
    runs = [_window_line("timed (no profiler)", timed)]
    sections: list[str] = []

    if pyspy is None:
        note = "py-spy is not installed (pip install -e '.[bench]'): no sampling profile"
        print(f"  {note}", flush=True)
        sections.append(note)
    else:
        raw_path = ctx.workdir / "bridge-pyspy-raw.txt"
        window = await _pyspy_window(ctx, bridge, ai, paths, token, pyspy, raw_path, bodies)
        print(_window_line("under py-spy", window), flush=True)
        runs.append(_window_line("under py-spy", window))
        samples = parse_raw(raw_path.read_text(errors="replace"))
        figures, text = analyse_pyspy(samples, plan.profile_native, plan.profile_rate,
                                      window.result.requests, window.thread_cpu,
                                      window.run_delay)
        result["pyspy"] = {"run": window.summary(), **figures}
        result["files"] = {"pyspy_raw": str(raw_path)}
        sections.append("== py-spy (sampling, every thread)\n\n" + text)

    if plan.profile_cprofile:
        window = await _cprofile_window(ctx, bridge, ai, paths, token, pstats_path, bodies)
        print(_window_line("under cProfile", window), flush=True)
        runs.append(_window_line("under cProfile", window))
        figures, text = analyse_cprofile(pstats_path, window.result.requests)
        result["cprofile"] = {"run": window.summary(), **figures}
        result.setdefault("files", {})["cprofile_pstats"] = str(pstats_path)
        sections.append("== cProfile (deterministic, the event loop's thread)\n\n" + text)

    traced = await _strace_section(ctx, bridge, ai, paths, token, bodies)
    if isinstance(traced, str):
        sections.append(traced)
    else:
        window, counts = traced
        print(_window_line("under strace", window), flush=True)
        runs.append(_window_line("under strace", window))
        requests = window.result.requests
        result["strace"] = {"run": window.summary(), "calls_per_turn": {
            name: calls / max(requests, 1) for name, calls in counts.items()}}
        sections.append("== strace (system calls, every thread)\n\n"
                        + strace_text(counts, requests))

    for server in (bridge, ai):
        ctx.procs.stop(server)
    lines = [header, "",
             "Runs (only the timed run's figures are the bridge's own; the profilers slow it)",
             *runs, "", _gc_text(timed), *sections]
    result["text"] = "\n".join(lines) + "\n"
    return result


def summary(result: dict[str, Any], limit: int = 8) -> Iterable[str]:
    """A few lines for the console: the runs, the biggest components and concerns."""
    timed = result["timed"]
    gc = timed.get("gc")
    trial = f", trial {' '.join(result['gc_options'])}" if result.get("gc_options") else ""
    face = ", /v1/responses" if result.get("face") == "responses" else ""
    yield (f"Profile ({result['loop']} loop, {result['connections']} connections{face}{trial}):"
           f" timed run {timed['rps']:.0f} msg/s, CPU/turn {timed['cpu_ms_per_turn']:.3f} ms"
           f" (loop thread {timed['loop_thread_cpu_ms_per_turn']:.3f} ms),"
           f" {timed['switches_per_turn']:.1f} context switches/turn"
           + (f", GC {sum(gc['us_per_turn']):.0f} µs/turn" if gc else ""))
    spy = result.get("pyspy")
    if spy:
        total = spy["cpu_seconds"] * 1e6 / max(spy["turns"], 1)

        def share(us: float) -> str:
            return f"{100 * us / total:5.1f}% {us:6.0f} µs/turn"

        yield "  CPU by component (py-spy, shares of the process's CPU):"
        for name, us in list(spy["us_per_turn_by_component"].items())[:limit]:
            yield f"    {share(us)}  {name}"
        yield "  cross-cutting (py-spy, inclusive, overlapping):"
        for name, us in sorted(spy["us_per_turn_by_concern"].items(),
                               key=lambda kv: -kv[1])[:limit]:
            yield f"    {share(us)}  {name}"
    traced = result.get("strace")
    if traced:
        calls = sorted(traced["calls_per_turn"].items(), key=lambda kv: -kv[1])
        yield (f"  system calls per turn (strace): {sum(v for _, v in calls):.1f}; "
               + "; ".join(f"{value:.1f} {name}" for name, value in calls[:6]))
    cprof = result.get("cprofile")
    if cprof:
        calls = cprof["calls_per_turn"]
        yield ("  per turn (cProfile): " + "; ".join(
            f"{value:.1f} {name.split(' (')[0]}" for name, value in calls.items()))
