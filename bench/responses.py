"""The `responses` part of `make bench`: OpenAI's Responses API through the bridge, on a real model.

Four 10-turn conversations with the same instructions, the same questions,
``temperature`` 0 and at most ``MAX_OUTPUT_TOKENS`` tokens a reply, held
against one llama-server (SmolLM2, ``llama_server.py``), turn by turn in
alternation so that all four see the same load on the shared cores:

- ``chain``: through the bridge with the official ``openai`` SDK
  (``AsyncOpenAI``), each response continuing the last by
  ``previous_response_id``;
- ``conversation``: through the bridge, ``conversations.create`` and then
  ``responses.create(conversation=...)``;
- ``best``: the same turns sent straight to llama-server's
  ``/v1/chat/completions`` with the same SDK, the history byte-stable (the
  instructions, then every earlier question and reply exactly as returned):
  the best a client can do;
- ``naive``: the same straight to llama-server with the current time at the
  top of the system prompt, as many clients do: the prompt changes from its
  first line every turn.

Every request streams; the time to the first piece is the first
``response.output_text.delta`` event (through the bridge) or the first chunk
with content (straight). Per turn: the prompt tokens llama-server computed
(not served from its cache: through the bridge ``usage.input_tokens -
input_tokens_details.cached_tokens``, straight llama.cpp's
``timings.prompt_n``), the time to the first piece and the whole turn.

**Separate caches.** llama-server runs 4 slots of 2048 tokens with its RAM
prompt cache off (``--cache-ram 0``) and slot choice by prompt similarity off
(``--slot-prompt-similarity 0``). The straight clients pin their slots
(``id_slot`` 2 and 3); the bridge, in its default configuration (no slot
files), pins nothing, so llama-server gives each of its requests the least
recently used slot. A warm-up request on each slot in order (0, 1, 2, 3) and
the fixed order of every round (chain, conversation, best, naive) make that
slot 0 for the chain and slot 1 for the conversation, every turn. The slot
each request ran on is read from ``GET /slots`` after it (not timed) and
reported: a conversation that ran on another's slot is flagged.

    python bench/responses.py             # this part alone (about a minute when idle)
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from llama_server import MODEL_ALIAS, MODEL_NAME, LlamaServer, missing_reason
from model_parts import ModelBridge, run_part_alone
from real_model import QUESTIONS, SCENARIO

TURNS = 10
MAX_OUTPUT_TOKENS = 48
TEMPERATURE = 0.0
SLOTS = 4
# One thread: on two shared, loaded cores llama.cpp's two threads wait for
# each other at every step, and a turn took from 1 to 38 s; with one it is
# both faster and far steadier here.
LLAMA_THREADS = 1
CTX_SIZE = 8192  # 4 slots of 2048 tokens: 10 turns fit without trimming
TURN_TIMEOUT = 600.0
BRIDGE_READY_DEADLINE = 60.0
RUNS = ("chain", "conversation", "best", "naive")
# The slot each run should hold (see the module's docstring).
PLANNED_SLOT = {"chain": 0, "conversation": 1, "best": 2, "naive": 3}
LABELS = {
    "chain": "bridge, previous_response_id",
    "conversation": "bridge, conversation",
    "best": "straight, byte-stable history",
    "naive": "straight, time on top",
}
# The targets: printed with the figures, never asserted.
TARGET_COMPUTED_RATIO = 1.05
TARGET_ADDED_FIRST_MS = 5.0


@dataclass
class Turn:
    computed: int
    prompt: int
    output: int
    first_ms: float | None
    total_ms: float
    status: str
    slot: int | None = None
    # llama-server's own prompt eval time (its log): the model's share of first_ms.
    prompt_eval_ms: float | None = None
    text: str = ""

    @property
    def outside_ms(self) -> float | None:
        """first_ms less the model's prompt eval: the HTTP, the template, the bridge."""
        if self.first_ms is None or self.prompt_eval_ms is None:
            return None
        return self.first_ms - self.prompt_eval_ms


class Skipped(Exception):
    """The part cannot run here; the message says why."""


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise Skipped("the openai package is not installed (pip install -e '.[test]')") from None
    return openai


# -- the bridge --------------------------------------------------------------------------------


class BridgeRun:
    """One conversation through the bridge's Responses API: a chain or a conversation."""

    def __init__(self, client: Any, kind: str) -> None:
        self._client = client
        self._kind = kind
        self._previous: str | None = None
        self.conversation: str | None = None

    async def start(self) -> None:
        if self._kind == "conversation":
            self.conversation = (await self._client.conversations.create()).id

    async def turn(self, question: str) -> Turn:
        extra: dict[str, Any] = {}
        if self._kind == "chain" and self._previous is not None:
            extra["previous_response_id"] = self._previous
        elif self._kind == "conversation":
            extra["conversation"] = self.conversation
        started = time.perf_counter()
        first: float | None = None
        final: Any = None
        stream = await self._client.responses.create(
            model=MODEL_ALIAS, instructions=SCENARIO, input=question,
            max_output_tokens=MAX_OUTPUT_TOKENS, temperature=TEMPERATURE, stream=True, **extra,
        )
        async for event in stream:
            if event.type == "response.output_text.delta":
                if first is None:
                    first = time.perf_counter()
            elif event.type in ("response.completed", "response.incomplete"):
                final = event.response
            elif event.type in ("response.failed", "error"):
                raise RuntimeError(f"the response failed: {event}")
        total = time.perf_counter() - started
        if final is None:
            raise RuntimeError("the bridge's stream ended without response.completed")
        self._previous = final.id
        usage = final.usage
        if usage is None:
            raise RuntimeError("the bridge reported no usage")
        cached = usage.input_tokens_details.cached_tokens if usage.input_tokens_details else 0
        return Turn(
            computed=usage.input_tokens - (cached or 0), prompt=usage.input_tokens,
            output=usage.output_tokens, first_ms=_ms_since(started, first),
            total_ms=total * 1000, status=final.status or "", text=final.output_text,
        )


# -- straight to llama-server ------------------------------------------------------------------


class StraightRun:
    """The same turns sent straight to llama-server's /v1/chat/completions, pinned to a slot.

    ``stamp``: the current time at the top of the system prompt (the naive
    client); without it the history is byte-stable (the best case).
    """

    def __init__(self, client: Any, slot: int, *, stamp: bool) -> None:
        self._client = client
        self._slot = slot
        self._stamp = stamp
        self._history: list[dict[str, str]] = []

    async def start(self) -> None:
        pass

    async def turn(self, question: str) -> Turn:
        system = SCENARIO
        if self._stamp:
            system = f"Current time: {datetime.datetime.now().isoformat()}\n{SCENARIO}"
        messages = [{"role": "system", "content": system}, *self._history,
                    {"role": "user", "content": question}]
        started = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        timings: dict[str, Any] = {}
        usage: Any = None
        finish = ""
        stream = await self._client.chat.completions.create(
            model=MODEL_ALIAS, messages=messages, max_tokens=MAX_OUTPUT_TOKENS,
            temperature=TEMPERATURE, stream=True, stream_options={"include_usage": True},
            extra_body={"id_slot": self._slot, "cache_prompt": True},
        )
        async for chunk in stream:
            for choice in chunk.choices or []:
                if choice.delta and choice.delta.content:
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
            timings = (chunk.model_extra or {}).get("timings") or timings
            usage = chunk.usage or usage
        total = time.perf_counter() - started
        text = "".join(pieces)
        self._history += [{"role": "user", "content": question},
                          {"role": "assistant", "content": text}]
        if "prompt_n" in timings:
            computed = int(timings["prompt_n"])
            prompt = computed + int(timings.get("cache_n", 0))
        elif usage is not None:
            details = usage.prompt_tokens_details
            cached = (details.cached_tokens if details else 0) or 0
            computed, prompt = usage.prompt_tokens - cached, usage.prompt_tokens
        else:
            raise RuntimeError("llama-server reported neither timings nor usage")
        return Turn(
            computed=computed, prompt=prompt,
            output=usage.completion_tokens if usage is not None
            else int(timings.get("predicted_n", 0)),
            first_ms=_ms_since(started, first), total_ms=total * 1000,
            status="incomplete" if finish == "length" else "completed", text=text,
        )


def _ms_since(started: float, at: float | None) -> float | None:
    return (at - started) * 1000 if at is not None else None


# -- the measurement ---------------------------------------------------------------------------


async def _last_slot(http: aiohttp.ClientSession, llama: LlamaServer) -> int | None:
    """The slot that ran the latest task (GET /slots), or None when the server does not say."""
    try:
        async with http.get(llama.root + "/slots") as response:
            slots = await response.json()
    except (aiohttp.ClientError, ValueError):
        return None
    tasks = [(s["id_task"], s["id"]) for s in slots
             if isinstance(s, dict) and isinstance(s.get("id_task"), int)]
    return max(tasks)[1] if tasks else None


_PROMPT_EVAL = re.compile(
    r"id +(\d+) \| task +(\d+) \| prompt eval time = +([\d.]+) ms"
)


class LogTail:
    """llama-server's log, read as it grows: each task's prompt eval time."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0

    async def prompt_eval(self, slot: int | None) -> float | None:
        """The prompt eval time of the latest task logged since the last call, or None.

        The log is written by a thread of its own, so the line may come a
        moment after the answer: wait for it briefly.
        """
        for _ in range(50):
            with self._path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
            # Only whole lines: a line being written is read again next time.
            data = data[: data.rfind(b"\n") + 1]
            found = [m for m in _PROMPT_EVAL.finditer(data.decode(errors="replace"))
                     if slot is None or int(m[1]) == slot]
            if found:
                self._offset += len(data)
                return float(found[-1][3])
            await asyncio.sleep(0.02)
        return None


async def _warm_up(http: aiohttp.ClientSession, llama: LlamaServer) -> None:
    """One tiny completion on each slot in order: no run pays the first-request setup, and
    the least recently used slot is then slot 0, then 1 (the bridge's two runs)."""
    for slot in range(SLOTS):
        async with http.post(llama.base_url + "/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "id_slot": slot,
        }) as response:
            if response.status != 200:
                raise RuntimeError(f"llama-server answered {response.status} to the warm-up:"
                                   f" {(await response.text())[:300]}")
            await response.read()


async def measure(workdir: Path) -> dict[str, Any]:
    try:
        openai = _openai()
    except Skipped as exc:
        print(f"  skipped: {exc}", flush=True)
        return {"skipped": str(exc)}
    reason = missing_reason()
    if reason:
        print(f"  skipped: {reason}", flush=True)
        return {"skipped": reason}
    load_before = os.getloadavg()
    llama = LlamaServer(
        workdir / "responses-slots", workdir / "responses-llama-server.log",
        parallel=SLOTS, ctx_size=CTX_SIZE, threads=LLAMA_THREADS,
        extra=("--cache-ram", "0", "--slot-prompt-similarity", "0"),
    )
    bridge: ModelBridge | None = None
    rows: list[dict[str, Any]] = []
    try:
        print(f"  starting llama-server ({llama.root}, {SLOTS} slots) ...", flush=True)
        await asyncio.to_thread(llama.start)
        # The bridge in its default OpenAI-compatible configuration: no slot files.
        bridge = await asyncio.to_thread(
            ModelBridge, workdir, llama.base_url, "responses-bridge"
        )
        timeout = aiohttp.ClientTimeout(total=TURN_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            openai.AsyncOpenAI(base_url=bridge.url + "/v1", api_key=bridge.token,
                               max_retries=0, timeout=TURN_TIMEOUT) as through,
            openai.AsyncOpenAI(base_url=llama.base_url, api_key="none",
                               max_retries=0, timeout=TURN_TIMEOUT) as straight,
        ):
            await _warm_up(http, llama)
            log = LogTail(llama.log_path)
            runs: dict[str, BridgeRun | StraightRun] = {
                "chain": BridgeRun(through, "chain"),
                "conversation": BridgeRun(through, "conversation"),
                "best": StraightRun(straight, PLANNED_SLOT["best"], stamp=False),
                "naive": StraightRun(straight, PLANNED_SLOT["naive"], stamp=True),
            }
            for run in runs.values():
                await run.start()
            for number, question in enumerate(QUESTIONS[:TURNS], 1):
                row: dict[str, Any] = {"turn": number}
                for name, run in runs.items():
                    try:
                        turn = await run.turn(question)
                    except openai.APIError as exc:
                        raise RuntimeError(f"{name}, turn {number}: {exc}") from exc
                    turn.slot = await _last_slot(http, llama)
                    turn.prompt_eval_ms = await log.prompt_eval(turn.slot)
                    row[name] = {**asdict(turn), "outside_ms": turn.outside_ms}
                rows.append(row)
                print(f"  turn {number:2d} computed " + ", ".join(
                    f"{name} {row[name]['computed']:4d}" for name in RUNS
                ) + "; first ms " + ", ".join(
                    f"{name} {_ms(row[name]['first_ms'])}" for name in RUNS
                ), flush=True)
    finally:
        if bridge is not None:
            bridge.stop()
        llama.stop()
    load_after = os.getloadavg()
    return {
        "model": f"{MODEL_NAME} (llama.cpp llama-server, {SLOTS} slots of"
                 f" {CTX_SIZE // SLOTS} tokens, --cache-ram 0, --slot-prompt-similarity 0)",
        "turns": TURNS,
        "max_output_tokens": MAX_OUTPUT_TOKENS,
        "temperature": TEMPERATURE,
        "order": list(RUNS),
        "planned_slots": PLANNED_SLOT,
        "cpus": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "rows": rows,
        "totals": totals(rows),
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _difference(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _paired(rows: list[dict[str, Any]], name: str, field: str) -> float | None:
    """The median of the turn-by-turn differences from the best case."""
    return _median([d for row in rows
                    if (d := _difference(row[name][field], row["best"][field])) is not None])


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in RUNS:
        turns = [row[name] for row in rows]
        firsts = [t["first_ms"] for t in turns if t["first_ms"] is not None]
        outside = [t["outside_ms"] for t in turns if t["outside_ms"] is not None]
        out[name] = {
            "computed": sum(t["computed"] for t in turns),
            "prompt": sum(t["prompt"] for t in turns),
            "output": sum(t["output"] for t in turns),
            "first_ms_median": _median(firsts),
            "outside_ms_median": _median(outside),
            "total_ms_median": _median([t["total_ms"] for t in turns]),
            "total_s": sum(t["total_ms"] for t in turns) / 1000,
            "slots": [t["slot"] for t in turns],
            "on_planned_slot": all(t["slot"] == PLANNED_SLOT[name] for t in turns),
            "same_reply_as_best": sum(t["text"] == row["best"]["text"]
                                      for t, row in zip(turns, rows, strict=True)),
        }
    best = out["best"]
    for name in ("chain", "conversation", "naive"):
        run = out[name]
        run["vs_best"] = {
            "computed": _ratio(run["computed"], best["computed"]),
            "first_ms_median_added": _difference(run["first_ms_median"],
                                                 best["first_ms_median"]),
            "first_ms_median_ratio": _ratio(run["first_ms_median"], best["first_ms_median"]),
            # Steadier than the medians' difference on loaded cores.
            "first_ms_paired_median_added": _paired(rows, name, "first_ms"),
            # The same without llama-server's own prompt eval time, which
            # carries most of the noise: what the bridge itself adds.
            "outside_ms_median_added": _difference(run["outside_ms_median"],
                                                   best["outside_ms_median"]),
            "outside_ms_paired_median_added": _paired(rows, name, "outside_ms"),
            "total_ratio": _ratio(run["total_s"], best["total_s"]),
        }
    return out


def target_rows(result: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, figure, stated target, met) for bench/run.py's table of targets."""
    if "totals" not in result:
        return []
    rows: list[tuple[str, str, str, bool | None]] = []
    for name in ("chain", "conversation"):
        vs = result["totals"][name]["vs_best"]
        computed, added = vs["computed"], vs["first_ms_median_added"]
        rows.append((f"Responses {name}: computed tokens / best case",
                     f"{computed:.3f}x" if computed is not None else "-",
                     f"<= {TARGET_COMPUTED_RATIO}x",
                     computed <= TARGET_COMPUTED_RATIO if computed is not None else None))
        rows.append((f"Responses {name}: median first token vs best case",
                     f"{added:+.1f} ms" if added is not None else "-",
                     f"<= +{TARGET_ADDED_FIRST_MS:.0f} ms",
                     added <= TARGET_ADDED_FIRST_MS if added is not None else None))
    return rows


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.0f}"


def _x(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}x" if value is not None else "-"


def print_report(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(f"Responses API: skipped ({result['skipped']})")
        print()
        return
    print(f"Responses API on a real model: {result['model']}; {result['turns']} turns,"
          f" max_output_tokens {result['max_output_tokens']}, temperature"
          f" {result['temperature']:g}; load average {result['load_average_before'][0]:.2f}"
          f" before, {result['load_average_after'][0]:.2f} after ({result['cpus']} CPUs)")
    print("  computed: prompt tokens llama-server computed (not from its cache), of the whole"
          " prompt; first: ms to the first text delta; eval: llama-server's own prompt eval"
          " ms (its log); total: ms to the end of the stream")
    header = "".join(f" | {name:^31}" for name in RUNS)
    print(f"  {'turn':>4}{header}")
    print(f"  {'':>4}" + f" | {'computed':>12}{'first':>7}{'eval':>6}{'total':>6}" * len(RUNS))
    for row in result["rows"]:
        cells = "".join(
            f" | {row[n]['computed']:>4} of {row[n]['prompt']:>4}{_ms(row[n]['first_ms']):>7}"
            f"{_ms(row[n]['prompt_eval_ms']):>6}{_ms(row[n]['total_ms']):>6}" for n in RUNS
        )
        print(f"  {row['turn']:>4}{cells}")
    t = result["totals"]
    turns = len(result["rows"])
    print(f"  {'run':<13} {'what':<30}{'computed':>9}{'first':>7}{'outside':>8}{'total':>7}"
          f"{'all s':>7}  (medians in ms; outside = first - eval)")
    for name in RUNS:
        r = t[name]
        slots = "as planned" if r["on_planned_slot"] else f"MOVED {r['slots']}"
        print(f"  {name:<13} {LABELS[name]:<30}{r['computed']:>9}{_ms(r['first_ms_median']):>7}"
              f"{_ms(r['outside_ms_median']):>8}{_ms(r['total_ms_median']):>7}"
              f"{r['total_s']:>7.1f}  slot {PLANNED_SLOT[name]} {slots},"
              f" {r['same_reply_as_best']}/{turns} replies as the best case's")
    for name in ("chain", "conversation", "naive"):
        vs = t[name]["vs_best"]
        print(f"  {name}/best: computed {_x(vs['computed'], 3)}; first token: medians"
              f" {_ms(vs['first_ms_median_added'], True)} ms"
              f" ({_x(vs['first_ms_median_ratio'])}), turn by turn"
              f" {_ms(vs['first_ms_paired_median_added'], True)} ms; outside the model:"
              f" medians {_ms(vs['outside_ms_median_added'], True)} ms, turn by turn"
              f" {_ms(vs['outside_ms_paired_median_added'], True)} ms;"
              f" all turns {_x(vs['total_ratio'])}")
    print(f"  targets for the bridge: computed within {(TARGET_COMPUTED_RATIO - 1) * 100:.0f}%"
          f" of the best case, median first token within {TARGET_ADDED_FIRST_MS:.0f} ms"
          " (reported, never asserted)")
    print()


async def phase(ctx: Any) -> dict[str, Any]:
    """The `responses` part of bench/run.py."""
    return await measure(ctx.workdir)


def main() -> int:
    return run_part_alone("responses", measure, print_report)[0]


if __name__ == "__main__":
    sys.exit(main())
