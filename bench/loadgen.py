"""The load generator: wrk with bench/turns.lua, or a Python stand-in when wrk is absent.

Both post the same body to the same paths, round-robin, from a fixed number
of connections for a fixed time (and optionally up to a number of answered
messages), and report the same figures. wrk is preferred: it is written in C
and on a two-core machine a Python generator competes with the servers for
CPU, so its figures are a floor rather than a measurement of the servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

LUA_SCRIPT = Path(__file__).resolve().parent / "turns.lua"
CONTENT = "How far is it from the station to the old harbour?"
# One body both targets understand, so both receive the very same bytes: the
# bridge reads "content" (and max_tokens), the passthrough hands it unchanged
# to the AI server's /chat, which reads "message" and max_tokens.
BODY = json.dumps({"content": CONTENT, "message": CONTENT, "max_tokens": 64})
REQUEST_TIMEOUT = 30.0
LIMIT_MARKER = "BENCH_LIMIT_REACHED"
# Beyond the time box, wrk gets this long to print its summary before it is killed.
WRK_GRACE = 30.0
# A hard cap on the Python generator's requests, on top of its time box.
MAX_PYTHON_REQUESTS = 2_000_000


@dataclass(frozen=True)
class LoadResult:
    generator: str
    connections: int
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    http_errors: int  # answers with a status of 400 or more
    socket_errors: int  # connect, read and write errors and timeouts
    # CPU the measured server and the AI server spent per answered message,
    # filled in by the caller, which knows the processes.
    server_cpu_ms: float | None = None
    ai_cpu_ms: float | None = None
    # Of server_cpu_ms, what the main thread (the event loop) spent; and the
    # measured server's context switches per message (thread hand-offs).
    server_main_cpu_ms: float | None = None
    server_switches: float | None = None
    # Of server_cpu_ms, what the kernel spent for it (system time).
    server_sys_cpu_ms: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def write_ids(path: Path, session_ids: list[str]) -> Path:
    """One session id a line: what the passthrough is started with (its --sessions-file)."""
    path.write_text("".join(sid + "\n" for sid in session_ids))
    return path


def write_paths(path: Path, session_ids: list[str]) -> Path:
    path.write_text("".join(f"/v1/sessions/{sid}/messages\n" for sid in session_ids))
    return path


def response_body(conversation_id: str) -> str:
    """A ``POST /v1/responses`` body: the same question, in the conversation given."""
    return json.dumps({"model": "bench", "input": CONTENT, "conversation": conversation_id,
                       "max_output_tokens": 64})


def write_response_requests(
    paths: Path, bodies: Path, conversation_ids: list[str]
) -> tuple[Path, Path]:
    """``POST /v1/responses`` to each conversation in turn: the paths and their bodies."""
    paths.write_text("/v1/responses\n" * len(conversation_ids))
    bodies.write_text("".join(response_body(cid) + "\n" for cid in conversation_ids))
    return paths, bodies


class LoadGenerator:
    """Runs one load run against a base URL; wrk when present unless told otherwise."""

    def __init__(self, prefer_wrk: bool = True) -> None:
        self.wrk = wrk_path() if prefer_wrk else None
        self.name = "wrk" if self.wrk else "python"

    async def run(
        self,
        base_url: str,
        paths_file: Path,
        token: str,
        connections: int,
        duration: float,
        limit: int | None = None,
        bodies_file: Path | None = None,
    ) -> LoadResult:
        """``bodies_file``: one body a line, sent with the path of the same line (else BODY)."""
        if self.wrk:
            return await self._run_wrk(base_url, paths_file, token, connections, duration, limit,
                                       bodies_file)
        paths = [line for line in paths_file.read_text().splitlines() if line]
        bodies = None
        if bodies_file is not None:
            bodies = [line for line in bodies_file.read_text().splitlines() if line]
        return await python_load(base_url, paths, token, connections, duration, limit, bodies)

    async def _run_wrk(
        self,
        base_url: str,
        paths_file: Path,
        token: str,
        connections: int,
        duration: float,
        limit: int | None,
        bodies_file: Path | None = None,
    ) -> LoadResult:
        assert self.wrk is not None
        env = dict(os.environ, BENCH_PATHS=str(paths_file), BENCH_TOKEN=token, BENCH_BODY=BODY,
                   BENCH_BODIES=str(bodies_file) if bodies_file is not None else "")
        if limit is not None:
            env["BENCH_LIMIT"] = str(limit)
        # One wrk thread: wrk shares the two cores with the servers it measures.
        argv = [self.wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
                f"--timeout={int(REQUEST_TIMEOUT)}s", "-s", str(LUA_SCRIPT), base_url]
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None and process.stderr is not None
        stdout_lines: list[str] = []

        async def read_stdout() -> None:
            assert process.stdout is not None
            async for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                stdout_lines.append(line)
                # SIGINT makes wrk stop at once and still print its summary.
                if line == LIMIT_MARKER and process.returncode is None:
                    process.send_signal(signal.SIGINT)

        try:
            _, stderr, _ = await asyncio.wait_for(
                asyncio.gather(read_stdout(), process.stderr.read(), process.wait()),
                duration + WRK_GRACE,
            )
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError(f"wrk did not finish within {duration + WRK_GRACE}s") from None
        return parse_wrk("\n".join(stdout_lines), stderr.decode(errors="replace"), connections)


def parse_wrk(stdout: str, stderr: str, connections: int) -> LoadResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no figures:\n{stdout}\n{stderr}")
    figures = json.loads(line.removeprefix("BENCH_JSON "))
    duration_s = figures["duration_us"] / 1e6
    return LoadResult(
        generator="wrk",
        connections=connections,
        requests=figures["requests"],
        duration_s=duration_s,
        rps=figures["requests"] / duration_s if duration_s else 0.0,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        mean_ms=figures["mean_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
        http_errors=figures["http_errors"],
        socket_errors=sum(figures[name] for name in
                          ("connect_errors", "read_errors", "write_errors", "timeouts")),
    )


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


async def python_load(
    base_url: str,
    paths: list[str],
    token: str,
    connections: int,
    duration: float,
    limit: int | None = None,
    bodies: list[str] | None = None,
) -> LoadResult:
    """The stand-in for wrk: ``connections`` workers, each one request at a time."""
    latencies: list[float] = []
    http_errors = 0
    socket_errors = 0
    issued = 0
    cap = min(limit if limit is not None else MAX_PYTHON_REQUESTS, MAX_PYTHON_REQUESTS)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    payload = BODY.encode()
    started = time.perf_counter()
    deadline = started + duration

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal issued, http_errors, socket_errors
        while issued < cap and time.perf_counter() < deadline:
            path = paths[issued % len(paths)]
            data = payload if bodies is None else bodies[issued % len(paths)].encode()
            issued += 1
            sent = time.perf_counter()
            try:
                async with http.post(base_url + path, data=data, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                socket_errors += 1
                continue
            latencies.append(time.perf_counter() - sent)
            if status >= 400:
                http_errors += 1

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    ) as http:
        await asyncio.gather(*(worker(http) for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        generator="python",
        connections=connections,
        requests=len(latencies),
        duration_s=elapsed,
        rps=len(latencies) / elapsed if elapsed else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        mean_ms=statistics.fmean(latencies) * 1000 if latencies else 0.0,
        max_ms=latencies[-1] * 1000 if latencies else 0.0,
        http_errors=http_errors,
        socket_errors=socket_errors,
    )


def median_result(results: list[LoadResult]) -> dict[str, Any]:
    """Each figure's median over repeated runs, with error counts summed (none may hide)."""
    return {
        "runs": len(results),
        "requests": sum(r.requests for r in results),
        "rps": statistics.median(r.rps for r in results),
        "p50_ms": statistics.median(r.p50_ms for r in results),
        "p99_ms": statistics.median(r.p99_ms for r in results),
        "mean_ms": statistics.median(r.mean_ms for r in results),
        "max_ms": max(r.max_ms for r in results),
        "http_errors": sum(r.http_errors for r in results),
        "socket_errors": sum(r.socket_errors for r in results),
        "server_cpu_ms": _median_of(r.server_cpu_ms for r in results),
        "ai_cpu_ms": _median_of(r.ai_cpu_ms for r in results),
        "server_main_cpu_ms": _median_of(r.server_main_cpu_ms for r in results),
        "server_switches": _median_of(r.server_switches for r in results),
        "server_sys_cpu_ms": _median_of(r.server_sys_cpu_ms for r in results),
    }


def _median_of(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None
