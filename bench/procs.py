"""The processes a benchmark run starts: the reference AI server, the bridge, the passthrough.

Each server is its own process on a free loopback port, so the load generator,
the servers and this driver never share an event loop. Every process is
registered with one :class:`Processes` whose ``close()`` stops and reaps all of
them, so an interrupted run leaves nothing behind. Output goes to log files in
the run's work folder; a server that fails to start shows its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
AI_USER = "dev"
AI_PASSWORD = "dev"
READY_DEADLINE = 30.0
STOP_DEADLINE = 10.0
BENCH_DIR = Path(__file__).resolve().parent

# Variables that would change what a child does if this run inherited them.
_INHERITED_NOISE = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class StartError(RuntimeError):
    """A server did not come up; the message carries the end of its log."""


def free_port() -> int:
    """A port nothing listens on right now (bind to port 0 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This run's environment without SESSIONBRIDGE_* or service-manager variables."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SESSIONBRIDGE_") and name not in _INHERITED_NOISE
    }
    env.update(extra)
    return env


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in KiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(rest.split()[0])
    return fields


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User plus system CPU time a process has used so far, all its threads included.

    With ``tid``, that one thread's (``tid == pid`` is the main thread, the
    event loop's).
    """
    return sum(cpu_split(pid, tid))


def cpu_split(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (or of its thread ``tid``) so far.

    System time is the kernel working for the process: socket sends and
    receives (on loopback, much of the receiver's TCP work too), epoll, the
    futex wake-ups of thread hand-offs, fsync.
    """
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, encoding="ascii") as stat:
        # The command name in parentheses may hold spaces; the fields after it do not.
        fields = stat.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def context_switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of all the process's threads so far.

    Every hand-off between the event loop and a thread (a database thread
    waking, then waking the loop) is at least one voluntary switch, so the
    figure per message shows how many such hops a turn makes.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return total


def loaded(pid: int, fragment: str) -> bool:
    """Whether a file whose path holds ``fragment`` is mapped into the process (a C extension)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
        return any(fragment in line for line in maps)


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    # In MB (10^6 bytes), the unit the targets are stated in.
    def rss_mb(self) -> float:
        return memory_kib(self.pid)["VmRSS"] * 1024 / 1e6

    def peak_rss_mb(self) -> float:
        return memory_kib(self.pid)["VmHWM"] * 1024 / 1e6

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def system_cpu_seconds(self) -> float:
        return cpu_split(self.pid)[1]

    def main_thread_cpu_seconds(self) -> float:
        return cpu_seconds(self.pid, self.pid)

    def context_switches(self) -> int:
        return context_switches(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def launched(
    argv: list[str], loop: str | None, cprofile: Path | None = None, gc_stats: Path | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """``argv`` (``python -m ...`` or ``python script ...``) through bench/launch.py when
    a loop, cProfile or GC statistics are asked for; unchanged otherwise.

    Both programs run their loop through the launcher, so bridge and
    passthrough differ in nothing but the program (the bridge's own
    SESSIONBRIDGE_EVENT_LOOP=uvloop does the same as the launcher's policy).
    """
    if loop is None and cprofile is None and gc_stats is None and not extra:
        return argv
    interpreter = [argv[0]]
    options = ["--loop", loop or "asyncio"]
    if cprofile is not None:
        options += ["--cprofile", str(cprofile)]
    if gc_stats is not None:
        options += ["--gc-stats", str(gc_stats)]
    options += extra or []
    return [*interpreter, str(BENCH_DIR / "launch.py"), *options, *argv[1:]]


class Processes:
    """Starts servers and stops every one of them on close()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._servers: list[Server] = []

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], port: int) -> Server:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        server = Server(name, popen, port, log_path)
        self._servers.append(server)
        return server

    def _wait_ready(self, server: Server, path: str) -> None:
        deadline = time.monotonic() + READY_DEADLINE
        while time.monotonic() < deadline:
            if server.popen.poll() is not None:
                raise StartError(f"{server.name} exited with {server.popen.returncode}:\n"
                                 f"{server.log_tail()}")
            try:
                with urllib.request.urlopen(server.url + path, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise StartError(f"{server.name} not ready after {READY_DEADLINE}s:\n{server.log_tail()}")

    def devserver(self, name: str, delay: float) -> Server:
        """The reference AI server, concurrent (not --serial), answering after ``delay`` s."""
        port = free_port()
        argv = [sys.executable, "-m", "sessionbridge.reference.seed_server", "--host", HOST,
                "--port", str(port), "--delay", str(delay),
                "--user", AI_USER, "--password", AI_PASSWORD]
        server = self._spawn(name, argv, clean_env(), port)
        self._wait_ready(server, "/health")
        return server

    def _check_loop(self, server: Server, loop: str | None) -> None:
        # The launcher sets uvloop's policy; that the loop really is uvloop's
        # shows in the process having uvloop's extension loaded.
        if loop == "uvloop" and not loaded(server.pid, "uvloop/loop"):
            raise StartError(f"{server.name} was asked to run on uvloop but has not loaded it")

    def bridge(
        self, name: str, db: Path | str, upstream: Server,
        loop: str | None = None, cprofile: Path | None = None, gc_stats: Path | None = None,
        launch_options: list[str] | None = None,
    ) -> Server:
        """The bridge; on ``loop`` (asyncio or uvloop), profiling itself on SIGUSR1/SIGUSR2
        into ``cprofile`` and counting its garbage collections into ``gc_stats`` when asked
        (bench/launch.py), else started as ``python -m``."""
        port = free_port()
        argv = launched(
            [sys.executable, "-m", "sessionbridge", "serve", "--host", HOST,
             "--port", str(port), "--db", str(db), "--upstream", upstream.url],
            loop, cprofile, gc_stats, launch_options,
        )
        env = clean_env(
            SESSIONBRIDGE_UPSTREAM_USER=AI_USER,
            SESSIONBRIDGE_UPSTREAM_PASSWORD=AI_PASSWORD,
            # Large enough that neither limit turns a benchmark request away:
            # the figures are about speed, not about 503 overloaded or 429 busy.
            SESSIONBRIDGE_MAX_INFLIGHT="256",
            SESSIONBRIDGE_SESSION_QUEUE="64",
            # Per-turn INFO lines would make the benchmark measure logging.
            SESSIONBRIDGE_LOG_LEVEL="WARNING",
        )
        server = self._spawn(name, argv, env, port)
        self._wait_ready(server, "/healthz")
        self._check_loop(server, loop)
        return server

    def passthrough(
        self, name: str, upstream: Server, sessions_file: Path, loop: str | None = None
    ) -> Server:
        port = free_port()
        argv = launched(
            [sys.executable, str(BENCH_DIR / "passthrough.py"), "--port", str(port),
             "--upstream", upstream.url, "--sessions-file", str(sessions_file),
             "--user", AI_USER, "--password", AI_PASSWORD],
            loop,
        )
        server = self._spawn(name, argv, clean_env(), port)
        self._wait_ready(server, "/healthz")
        self._check_loop(server, loop)
        return server

    def stop(self, server: Server) -> None:
        if server.popen.poll() is None:
            server.popen.terminate()
            try:
                server.popen.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                server.popen.kill()
                server.popen.wait(STOP_DEADLINE)
        if server in self._servers:
            self._servers.remove(server)

    def close(self) -> None:
        for server in list(reversed(self._servers)):
            self.stop(server)


def create_key(db: Path | str, name: str = "bench") -> str:
    """A fresh API key through the bridge's own CLI; its token is the last stdout line."""
    result = subprocess.run(
        [sys.executable, "-m", "sessionbridge", "keys", "create", name, "--db", str(db)],
        env=clean_env(SESSIONBRIDGE_LOG_LEVEL="WARNING"),
        capture_output=True, text=True, timeout=60, check=True,
    )
    return result.stdout.strip().splitlines()[-1]
