"""The real-model part of `make bench`: the bridge beside a naive client, on one llama-server.

One long conversation (past the context budget) with a restart of
llama-server in the middle, held twice against the same server, turn by turn
in alternation so that both see the same load on the shared cores:

- through the bridge (OpenAI-compatible flavor, slot files on): the history
  as stored, trimmed in steps, the slot saved after each turn and restored
  after the restart;
- through a naive client that sends the whole history every turn with the
  time at the top of the system prompt (what many clients do), dropping the
  oldest turn whenever the next prompt would not fit the same budget.

Per turn: prompt tokens the server computed (not served from its cache), time
to the first piece of the reply, and the whole turn. Through the bridge the
first piece is its first ``reply.delta`` event (docs/streaming.md); a bridge that
answers with JSON instead is timed as a whole turn, and the report says so.

    python bench/real_model.py            # this part alone (about a minute when idle)
"""

from __future__ import annotations

import asyncio
import datetime
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from llama_server import MODEL_NAME, LlamaServer, missing_reason
from model_parts import ModelBridge, run_part_alone

SCENARIO = (
    "You are the guide of a small maritime museum in a harbour town. The museum has"
    " three rooms: the first shows ship models from the last two centuries, the"
    " second holds paintings of storms, harbours and the families of fishermen, and"
    " the third keeps the logbooks, charts and instruments of the town's captains."
    " Visitors ask about the exhibits, the town and the sea. Answer in one or two"
    " short sentences, stay friendly and precise, never invent dates you do not"
    " know, and suggest the next room when a visitor seems lost. The museum opens at"
    " ten, closes at five, and the café on the top floor looks over the harbour."
)
QUESTIONS = [
    "Hello! Where should I start?",
    "What is the oldest ship model here?",
    "Who built it, and where?",
    "What do the storm paintings show?",
    "Which painter do people like most?",
    "Are the logbooks real?",
    "Can I read one of them?",
    "What instruments did the captains use?",
    "How did they find their way at night?",
    "Is there a painting of this harbour?",
    "What did the fishermen's families do in winter?",
    "Which room do children like best?",
    "Where is the café?",
    "Can I see the harbour from there?",
    "Is there a shop with postcards?",
    "Thank you, when do you close today?",
]
REPLY_TOKENS = 32
BUDGET = 768
RESTART_BEFORE = 10  # the turn (1-based) that follows a restart of llama-server
# Tokens a chat template adds around a message (the naive client's estimate).
TEMPLATE_TOKENS = 8
TURN_TIMEOUT = 600.0
BRIDGE_READY_DEADLINE = 60.0


@dataclass
class Turn:
    computed: int
    prompt: int
    ttft_ms: float | None
    total_ms: float
    ai_session: str = ""


# -- the naive client --------------------------------------------------------------------------


class NaiveClient:
    """Sends the whole history each turn, the time first; drops the oldest turn to fit.

    With ``stamp=False`` it is the bridge's own way without the bridge: the
    history exactly as received, the same system prompt every turn (the
    first-token comparison's direct client).
    """

    def __init__(self, http: aiohttp.ClientSession, llama: LlamaServer, *,
                 stamp: bool = True, id_slot: int | None = None) -> None:
        self._http = http
        self._llama = llama
        self._stamp = stamp
        self._id_slot = id_slot
        self.history: list[tuple[str, str]] = []
        self._counts: dict[str, int] = {}

    async def _tokens(self, text: str) -> int:
        if text not in self._counts:
            async with self._http.post(self._llama.root + "/tokenize",
                                       json={"content": text}) as response:
                self._counts[text] = len((await response.json())["tokens"])
        return self._counts[text]

    async def turn(self, question: str) -> Turn:
        system = SCENARIO
        if self._stamp:
            system = f"Current time: {datetime.datetime.now().isoformat()}\n{SCENARIO}"
        # Trimming to the budget is not timed: it is the client's own work.
        while True:
            texts = [system, *(t for pair in self.history for t in pair), question]
            needed = sum([await self._tokens(t) for t in texts]) + TEMPLATE_TOKENS * len(texts)
            if needed + REPLY_TOKENS <= BUDGET or not self.history:
                break
            self.history.pop(0)
        messages = [{"role": "system", "content": system}]
        for user, assistant in self.history:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": question})
        payload: dict[str, Any] = {
            "messages": messages, "max_tokens": REPLY_TOKENS, "stream": True
        }
        if self._id_slot is not None:
            payload["id_slot"] = self._id_slot
        started = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        timings: dict[str, Any] = {}
        async with self._http.post(self._llama.base_url + "/chat/completions",
                                   json=payload) as response:
            if response.status != 200:
                raise RuntimeError(f"llama-server answered {response.status}:"
                                   f" {(await response.text())[:300]}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        pieces.append(piece)
                timings = chunk.get("timings") or timings
        total = time.perf_counter() - started
        self.history.append((question, "".join(pieces)))
        return Turn(
            computed=int(timings.get("prompt_n", 0)),
            prompt=int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0)),
            ttft_ms=(first - started) * 1000 if first else None,
            total_ms=total * 1000,
        )


# -- through the bridge ------------------------------------------------------------------------


def model_bridge(workdir: Path, llama: LlamaServer, name: str = "real-bridge") -> ModelBridge:
    """The bridge with slot files on and this part's context budget."""
    return ModelBridge(
        workdir, llama.base_url, name,
        SESSIONBRIDGE_SLOT_SAVE="on",
        SESSIONBRIDGE_SLOT_DIR=str(llama.slot_dir),
        SESSIONBRIDGE_CONTEXT_TOKENS=str(BUDGET),
    )


async def bridge_turn(http: aiohttp.ClientSession, bridge: ModelBridge, session_id: str,
                      question: str) -> tuple[Turn, bool]:
    """One turn as an event stream; (figures, whether it really streamed)."""
    started = time.perf_counter()
    first: float | None = None
    body: dict[str, Any] | None = None
    async with http.post(
        f"{bridge.url}/v1/sessions/{session_id}/messages", json={"content": question},
        headers={"Authorization": f"Bearer {bridge.token}", "Accept": "text/event-stream"},
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"the bridge answered {response.status}:"
                               f" {(await response.text())[:300]}")
        streamed = response.content_type == "text/event-stream"
        if not streamed:
            body = await response.json()
        else:
            event = ""
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "reply.delta" and first is None:
                        first = time.perf_counter()
                    elif event == "turn.completed":
                        body = json.loads(line[5:])
                    elif event == "turn.failed":
                        raise RuntimeError(f"the turn failed: {line[5:300]}")
    total = time.perf_counter() - started
    if body is None:
        raise RuntimeError("the bridge's stream ended without turn.completed")
    usage = body["reply"].get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    return Turn(
        computed=prompt - int(usage.get("cached_tokens", 0)),
        prompt=prompt,
        ttft_ms=(first - started) * 1000 if first else None,
        total_ms=total * 1000,
        ai_session=body["ai_session"],
    ), streamed


# -- the measurement ---------------------------------------------------------------------------


def _warm_up(llama: LlamaServer) -> None:
    """One tiny completion, so neither client pays the server's first-request setup."""
    request = urllib.request.Request(
        llama.base_url + "/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                         "max_tokens": 1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=TURN_TIMEOUT) as response:
        response.read()


async def measure(workdir: Path) -> dict[str, Any]:
    reason = missing_reason()
    if reason:
        print(f"  skipped: {reason}", flush=True)
        return {"skipped": reason}
    llama = LlamaServer(workdir / "real-slots", workdir / "llama-server.log")
    bridge: ModelBridge | None = None
    rows: list[dict[str, Any]] = []
    streamed_all = True
    try:
        print(f"  starting llama-server ({llama.root}) ...", flush=True)
        llama.start()
        _warm_up(llama)
        bridge = model_bridge(workdir, llama)
        timeout = aiohttp.ClientTimeout(total=TURN_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(
                bridge.url + "/v1/sessions",
                json={"scenario": SCENARIO, "max_tokens": REPLY_TOKENS},
                headers={"Authorization": f"Bearer {bridge.token}"},
            ) as response:
                if response.status != 201:
                    raise RuntimeError(f"creating a session: {response.status}")
                session_id = (await response.json())["id"]
            naive = NaiveClient(http, llama)
            for number, question in enumerate(QUESTIONS, 1):
                event = ""
                if number == RESTART_BEFORE:
                    print("  restarting llama-server ...", flush=True)
                    await asyncio.to_thread(llama.restart)
                    _warm_up(llama)
                    event = "restart"
                through_bridge, streamed = await bridge_turn(http, bridge, session_id, question)
                streamed_all = streamed_all and streamed
                kept_before = len(naive.history)
                through_naive = await naive.turn(question)
                if rows and through_bridge.prompt < rows[-1]["bridge"]["prompt"]:
                    event = (event + " trim").strip()
                rows.append({
                    "turn": number, "event": event,
                    "bridge": asdict(through_bridge), "naive": asdict(through_naive),
                    "naive_dropped": kept_before - (len(naive.history) - 1),
                })
                print(f"  turn {number:2d} {event:<8} bridge computed {through_bridge.computed:4d}"
                      f" of {through_bridge.prompt:4d} ({through_bridge.ai_session}),"
                      f" naive {through_naive.computed:4d}", flush=True)
            bridge.stop()
            # A fresh server and bridge: the bridge's conversation takes slot
            # 0 (its slot table starts empty), the direct one is sent to slot 1,
            # so neither evicts the other's cache.
            await asyncio.to_thread(llama.restart)
            _warm_up(llama)
            bridge = model_bridge(workdir, llama, name="first-token-bridge")
            first_token = await first_token_rounds(http, bridge, llama)
    finally:
        if bridge is not None:
            bridge.stop()
        llama.stop()
    return {
        "first_token": first_token,
        "model": f"{MODEL_NAME} (llama.cpp llama-server, {llama.parallel} slots of"
                 f" {llama.ctx_size // llama.parallel} tokens)",
        "budget_tokens": BUDGET,
        "reply_tokens": REPLY_TOKENS,
        "restart_before_turn": RESTART_BEFORE,
        "bridge_streamed": streamed_all,
        "rows": rows,
        "totals": totals(rows),
    }


FIRST_TOKEN_ROUNDS = 11


async def first_token_rounds(
    http: aiohttp.ClientSession, bridge: ModelBridge, llama: LlamaServer
) -> dict[str, Any]:
    """Time to the first piece: through the bridge, and straight from llama-server.

    Two conversations with the same questions, in alternation: one through the
    bridge (its first ``reply.delta``), one sent straight to the server the
    bridge's way (the history exactly as received, so its cache is as warm).
    What the bridge adds before the request (storing the question, counting
    the message's tokens, looking at its slot) is in the difference.
    """
    async with http.post(
        bridge.url + "/v1/sessions",
        json={"scenario": SCENARIO, "max_tokens": REPLY_TOKENS},
        headers={"Authorization": f"Bearer {bridge.token}"},
    ) as response:
        session_id = (await response.json())["id"]
    direct = NaiveClient(http, llama, stamp=False, id_slot=1)
    rounds = []
    for question in QUESTIONS[:FIRST_TOKEN_ROUNDS]:
        through, _ = await bridge_turn(http, bridge, session_id, question)
        straight = await direct.turn(question)
        rounds.append({"bridge_ms": through.ttft_ms, "direct_ms": straight.ttft_ms})
    # The first round of each is a cold prompt; the rest are warm turns.
    warm = [r for r in rounds[1:] if r["bridge_ms"] is not None and r["direct_ms"] is not None]
    return {
        "rounds": rounds,
        "bridge_ms_median": statistics.median(r["bridge_ms"] for r in warm) if warm else None,
        "direct_ms_median": statistics.median(r["direct_ms"] for r in warm) if warm else None,
        "added_ms_median": statistics.median(r["bridge_ms"] - r["direct_ms"] for r in warm)
        if warm else None,
    }


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for who in ("bridge", "naive"):
        turns = [row[who] for row in rows]
        ttfts = [t["ttft_ms"] for t in turns if t["ttft_ms"] is not None]
        out[who] = {
            "computed": sum(t["computed"] for t in turns),
            "prompt": sum(t["prompt"] for t in turns),
            "ttft_ms_mean": sum(ttfts) / len(ttfts) if ttfts else None,
            # The shared cores make single turns slow now and then: the median is steadier.
            "ttft_ms_median": statistics.median(ttfts) if ttfts else None,
            "total_s": sum(t["total_ms"] for t in turns) / 1000,
        }
    b, n = out["bridge"], out["naive"]
    out["naive_over_bridge"] = {
        "computed": n["computed"] / b["computed"] if b["computed"] else None,
        "ttft": n["ttft_ms_median"] / b["ttft_ms_median"]
        if b["ttft_ms_median"] and n["ttft_ms_median"] else None,
        "total": n["total_s"] / b["total_s"] if b["total_s"] else None,
    }
    return out


def _ms(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


def print_report(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(f"Real model: skipped ({result['skipped']})")
        print()
        return
    first = "time to first reply.delta" if result["bridge_streamed"] else \
        "whole turn (the bridge answered JSON, not an event stream)"
    print(f"Real model: {result['model']}; budget {result['budget_tokens']} tokens,"
          f" {result['reply_tokens']}-token replies, llama-server restarted before turn"
          f" {result['restart_before_turn']}")
    print(f"  bridge: slot files on, history as stored; first token = {first}")
    print("  naive: whole history every turn, the time at the top of the system prompt")
    print(f"  {'turn':>4} {'':<8} | {'bridge computed':>15} {'first ms':>9} {'total ms':>9}"
          f" {'ai_session':<10} | {'naive computed':>14} {'first ms':>9} {'total ms':>9}")
    for row in result["rows"]:
        b, n = row["bridge"], row["naive"]
        print(f"  {row['turn']:>4} {row['event']:<8} | {b['computed']:>7} of {b['prompt']:>5}"
              f" {_ms(b['ttft_ms']):>9} {_ms(b['total_ms']):>9} {b['ai_session']:<10} |"
              f" {n['computed']:>6} of {n['prompt']:>5} {_ms(n['ttft_ms']):>9}"
              f" {_ms(n['total_ms']):>9}")
    t = result["totals"]
    ratio = t["naive_over_bridge"]
    print(f"  totals: computed prompt tokens bridge {t['bridge']['computed']:,},"
          f" naive {t['naive']['computed']:,} ({ratio['computed']:.1f}x);"
          f" median first token bridge {_ms(t['bridge']['ttft_ms_median'])} ms,"
          f" naive {_ms(t['naive']['ttft_ms_median'])} ms"
          + (f" ({ratio['ttft']:.1f}x)" if ratio["ttft"] else "")
          + f"; all turns bridge {t['bridge']['total_s']:.1f} s,"
          f" naive {t['naive']['total_s']:.1f} s ({ratio['total']:.1f}x)")
    first = result.get("first_token")
    if first and first.get("added_ms_median") is not None:
        print(f"  time to first piece over {len(first['rounds']) - 1} warm turns (medians):"
              f" through the bridge {first['bridge_ms_median']:.1f} ms, straight from"
              f" llama-server {first['direct_ms_median']:.1f} ms; the bridge adds"
              f" {first['added_ms_median']:.1f} ms")
    print()


async def phase(ctx: Any) -> dict[str, Any]:
    """The `real` part of bench/run.py."""
    return await measure(ctx.workdir)


def main() -> int:
    return run_part_alone("real model", measure, print_report)[0]


if __name__ == "__main__":
    sys.exit(main())
