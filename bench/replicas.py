"""The `replicas` part of `make bench`: two llama-servers behind the bridge's placement or nginx.

Two llama-servers (the model `make model` installs, one thread each, 4 slots
of 2048 tokens) serve 8 conversations of 8 turns, the conversations running
at once, each turn streamed. The same load runs twice on fresh servers:

- **placement**: the bridge is given both servers
  (``SESSIONBRIDGE_UPSTREAM_URL=a,b``) and keeps each conversation on one;
- **round robin**: the bridge is given one URL, an nginx (Debian's package)
  that passes requests to the two servers in turn, as a balancer in front of
  replicas would.

Each reports the share of prompt tokens the servers served from their cache,
the prompt tokens they computed, and the median time to the first piece of a
reply (the first ``reply.delta``), beside the best share any placement could
reach with these turns (the ceiling): every conversation's first prompt
computed whole, and each later turn only what is new in it (its prompt less
the previous prompt and reply). Then both run once more and one
llama-server is killed (SIGKILL) once 24 turns have been answered: the turns
that failed, and the time from the kill until every conversation has been
answered again.

    python bench/replicas.py        # this part alone (a few minutes on two cores)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from llama_server import MODEL_NAME, LlamaServer, missing_reason
from model_parts import ModelBridge, run_part_alone
from procs import free_port

TOPICS = [
    "a small maritime museum in a harbour town",
    "a mountain railway that climbs to a glacier",
    "an old botanical garden with a glass palm house",
    "a cheese dairy in an alpine valley",
    "a planetarium that shows the winter sky",
    "a medieval castle with a working blacksmith",
    "a paper mill turned into a printing museum",
    "a lighthouse on a rocky island",
]
QUESTIONS = [
    "Hello! Where should I start?",
    "What is the oldest thing here?",
    "Who made it, and when?",
    "What do most visitors like best?",
    "Is there something for children?",
    "Where can I eat nearby?",
    "How long should my visit take?",
    "Thank you, when do you close today?",
]
CONVERSATIONS = len(TOPICS)
# Replies of up to 64 tokens, as a chat's are: with 32, what is new in each turn
# (the question and its template) is so large a part of the prompt that the
# ceiling itself is about 90 % (90.2 % in the last run with 32).
REPLY_TOKENS = 64
KILL_AFTER = 24  # answered turns before one llama-server is killed
TURN_TIMEOUT = 600.0
READY_DEADLINE = 60.0


def scenario(topic: str) -> str:
    return (
        f"You are the guide of {topic}. Visitors ask about the place, its history and"
        " what to see next. Answer in one or two short sentences, stay friendly and"
        " precise, and never invent dates you do not know."
    )


@dataclass
class TurnResult:
    conversation: int
    ok: bool
    started: float  # monotonic
    ended: float
    ttft_ms: float | None = None
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    ai_session: str = ""
    error: str = ""


@dataclass
class Run:
    mode: str
    kill: bool
    turns: list[TurnResult] = field(default_factory=list)
    killed_at: float | None = None
    per_replica: dict[str, float] = field(default_factory=dict)


# -- the servers -----------------------------------------------------------------------------


class Nginx:
    """Debian's nginx as a round-robin proxy in front of the two servers."""

    def __init__(self, workdir: Path, upstreams: list[str]) -> None:
        self.port = free_port()
        self.prefix = workdir / f"nginx-{self.port}"
        (self.prefix / "logs").mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server {u};" for u in upstreams)
        conf = self.prefix / "nginx.conf"
        conf.write_text(f"""
user root;
worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {self.prefix}/body;
    proxy_temp_path {self.prefix}/proxy;
    upstream llama {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout {int(TURN_TIMEOUT)}s;
        }}
    }}
}}
""")
        self.popen = subprocess.Popen(
            ["nginx", "-p", str(self.prefix), "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answers (a llama-server behind it may still load)
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not answer: {self.log_tail()}") from None
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        try:
            return (self.prefix / "logs" / "error.log").read_text()[-1500:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGQUIT)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def nginx_missing() -> str | None:
    if shutil.which("nginx") is None:
        return "nginx is not installed (apt-get install nginx)"
    return None


# -- the load ----------------------------------------------------------------------------------


async def turn(
    http: aiohttp.ClientSession, bridge: ModelBridge, session_id: str, conversation: int,
    question: str,
) -> TurnResult:
    started = time.monotonic()
    result = TurnResult(conversation, False, started, started)
    try:
        async with http.post(
            f"{bridge.url}/v1/sessions/{session_id}/messages", json={"content": question},
            headers={"Authorization": f"Bearer {bridge.token}", "Accept": "text/event-stream"},
        ) as response:
            if response.status != 200:
                result.error = f"{response.status} {(await response.text())[:200]}"
                return result
            event = ""
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "reply.delta" and result.ttft_ms is None:
                        result.ttft_ms = (time.monotonic() - started) * 1000
                    elif event == "turn.completed":
                        body = json.loads(line[5:])
                        usage = body["reply"].get("usage") or {}
                        result.prompt = int(usage.get("prompt_tokens", 0))
                        result.cached = int(usage.get("cached_tokens", 0))
                        result.completion = int(usage.get("completion_tokens", 0))
                        result.ai_session = body["ai_session"]
                        result.ok = True
                    elif event == "turn.failed":
                        result.error = json.loads(line[5:]).get("code", "failed")
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error = type(exc).__name__
    finally:
        result.ended = time.monotonic()
    return result


async def conversation(
    http: aiohttp.ClientSession, bridge: ModelBridge, number: int, run: Run,
    answered: asyncio.Event, counter: list[int],
) -> None:
    async with http.post(
        bridge.url + "/v1/sessions",
        json={"scenario": scenario(TOPICS[number]), "max_tokens": REPLY_TOKENS},
        headers={"Authorization": f"Bearer {bridge.token}"},
    ) as response:
        if response.status != 201:
            raise RuntimeError(f"creating a session: {response.status}")
        session_id = (await response.json())["id"]
    for question in QUESTIONS:
        result = await turn(http, bridge, session_id, number, question)
        run.turns.append(result)
        if result.ok:
            counter[0] += 1
            if counter[0] >= KILL_AFTER:
                answered.set()


async def one_run(workdir: Path, mode: str, kill: bool) -> Run:
    """Fresh servers (empty caches), one bridge, the load; the killed server when ``kill``."""
    tag = f"{mode}{'-kill' if kill else ''}"
    llamas = [
        LlamaServer(workdir / f"slots-{tag}-{i}", workdir / f"llama-{tag}-{i}.log",
                    parallel=4, ctx_size=8192, threads=1)
        for i in range(2)
    ]
    nginx: Nginx | None = None
    bridge: ModelBridge | None = None
    run = Run(mode, kill)
    try:
        for llama in llamas:
            await asyncio.to_thread(llama.start)
        if mode == "round-robin":
            nginx = Nginx(workdir, [f"127.0.0.1:{llama.port}" for llama in llamas])
            upstream = nginx.url + "/v1"
        else:
            upstream = ",".join(llama.base_url for llama in llamas)
        bridge = ModelBridge(
            workdir, upstream, f"bridge-{tag}", ready_path="/readyz",
            SESSIONBRIDGE_READY_INTERVAL="0.5",
        )
        answered = asyncio.Event()
        counter = [0]
        timeout = aiohttp.ClientTimeout(total=TURN_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            load = asyncio.gather(*(
                conversation(http, bridge, number, run, answered, counter)
                for number in range(CONVERSATIONS)
            ))
            if kill:
                waiter = asyncio.create_task(answered.wait())
                await asyncio.wait([waiter, load], return_when=asyncio.FIRST_COMPLETED)
                victim = llamas[1]
                if victim.pid is not None:
                    os.kill(victim.pid, signal.SIGKILL)
                run.killed_at = time.monotonic()
                print(f"    killed llama-server {victim.root} after {counter[0]} answered turns",
                      flush=True)
            await load
        run.per_replica = replica_turns(bridge.metrics())
    finally:
        if bridge is not None:
            bridge.stop()
        if nginx is not None:
            nginx.stop()
        for llama in llamas:
            llama.stop()
    return run


def replica_turns(metrics: str) -> dict[str, float]:
    """Answered turns by replica, from the bridge's /metrics."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("sessionbridge_replica_turns_total{") and 'outcome="answered"' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            out[replica] = float(line.rsplit(" ", 1)[1])
    return out


# -- the figures -------------------------------------------------------------------------------


def summary(run: Run) -> dict[str, Any]:
    ok = [t for t in run.turns if t.ok]
    prompt = sum(t.prompt for t in ok)
    cached = sum(t.cached for t in ok)
    ttfts = [t.ttft_ms for t in ok if t.ttft_ms is not None]
    least = least_computed(run.turns)
    figures: dict[str, Any] = {
        "mode": run.mode,
        "turns": len(run.turns),
        "answered": len(ok),
        "failed": len(run.turns) - len(ok),
        "failures": sorted({t.error for t in run.turns if not t.ok}),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "computed_tokens": prompt - cached,
        "cached_share": cached / prompt if prompt else None,
        "ceiling_share": 1 - least / prompt if prompt else None,
        "ttft_ms_median": statistics.median(ttfts) if ttfts else None,
        "recovered_turns": sum(1 for t in ok if t.ai_session == "recovered"),
        "answered_by_replica": run.per_replica,
    }
    if run.killed_at is not None:
        killed = run.killed_at
        # For each conversation: from the kill to its first turn answered after it
        # (a turn that began before the kill and ended after it counts too).
        again = []
        for number in range(CONVERSATIONS):
            after = [t.ended for t in run.turns
                     if t.conversation == number and t.ok and t.ended > killed]
            if after:
                again.append(min(after) - killed)
        figures["failed_after_kill"] = sum(
            1 for t in run.turns if not t.ok and t.ended > killed
        )
        figures["seconds_until_all_answer_again"] = (
            max(again) if len(again) == CONVERSATIONS else None
        )
    return figures


def least_computed(turns: list[TurnResult]) -> int:
    """The prompt tokens the answered turns need computed at the least (the ceiling's).

    A conversation's first answered prompt whole; after an answered turn,
    only what is new (this prompt less that prompt and its reply); after a
    failed one, the whole prompt again.
    """
    least = 0
    for number in range(CONVERSATIONS):
        previous: TurnResult | None = None
        for t in sorted((t for t in turns if t.conversation == number), key=lambda t: t.started):
            if t.ok:
                if previous is None or not previous.ok:
                    least += t.prompt
                else:
                    least += max(0, t.prompt - previous.prompt - previous.completion)
            previous = t
    return least


async def measure(workdir: Path) -> dict[str, Any]:
    reason = missing_reason() or nginx_missing()
    if reason:
        print(f"  skipped: {reason}", flush=True)
        return {"skipped": reason}
    results: dict[str, Any] = {
        "model": f"{MODEL_NAME}, two llama-servers, 1 thread and 4 slots of 2048 tokens each",
        "conversations": CONVERSATIONS, "turns_each": len(QUESTIONS),
        "reply_tokens": REPLY_TOKENS, "kill_after": KILL_AFTER,
    }
    for kill in (False, True):
        for mode in ("placement", "round-robin"):
            name = f"{mode}{' with a kill' if kill else ''}"
            print(f"  {name} ...", flush=True)
            started = time.monotonic()
            run = await one_run(workdir, mode, kill)
            figures = summary(run)
            figures["seconds"] = time.monotonic() - started
            results[name] = figures
            results[name + " (turns)"] = [asdict(t) for t in run.turns]
            print(f"    {line(figures)}", flush=True)
    return results


def line(f: dict[str, Any]) -> str:
    share = f"{f['cached_share'] * 100:.1f} %" if f["cached_share"] is not None else "-"
    if f.get("ceiling_share") is not None:
        share += f" (ceiling {f['ceiling_share'] * 100:.1f} %)"
    ttft = f"{f['ttft_ms_median']:.0f} ms" if f["ttft_ms_median"] is not None else "-"
    text = (f"answered {f['answered']}/{f['turns']}, prompt tokens from cache {share},"
            f" computed {f['computed_tokens']:,}, median first token {ttft}")
    if "failed_after_kill" in f:
        again = f["seconds_until_all_answer_again"]
        text += (f"; failed after the kill {f['failed_after_kill']},"
                 f" every conversation answered again after"
                 f" {'-' if again is None else f'{again:.1f} s'}")
    return text


def print_report(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(f"Replicas: skipped ({result['skipped']})")
        print()
        return
    print(f"Replicas: {result['model']}; {result['conversations']} conversations x"
          f" {result['turns_each']} turns at once, {result['reply_tokens']}-token replies")
    for name in ("placement", "round-robin", "placement with a kill", "round-robin with a kill"):
        if name in result:
            print(f"  {name:<24} {line(result[name])}")
    print()


async def phase(ctx: Any) -> dict[str, Any]:
    """The `replicas` part of bench/run.py."""
    return await measure(ctx.workdir)


def main() -> int:
    status, result = run_part_alone("replicas", measure, print_report)
    out = Path(os.environ.get("REPLICAS_RESULT", ""))
    if result is not None and out.name:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
