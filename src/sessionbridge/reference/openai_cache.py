"""The simulated model behind the reference OpenAI-compatible server: NOT a model.

This private module owns the parts of :mod:`.openai_server` that stand in
for what a real inference server does below HTTP: a deterministic tokenizer,
a chat template (Gemma's, as llama.cpp's built-in one renders it), the
deterministic responder, and a pool of slots, each holding the tokens its
prompt cache would hold. Everything here is plain data and arithmetic, so the
cache rules can be read in one place:

- a prompt is served from a slot's cache as far as the two token lists agree
  from the start (a token-prefix match, as in llama.cpp), and computed after;
- a request naming ``id_slot`` gets that slot; otherwise the idle slot whose
  cache shares the largest part of the prompt (above a similarity threshold,
  as llama.cpp's ``--slot-prompt-similarity``), else the least recently used;
- after a reply the slot holds the prompt followed by the reply's tokens.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BOS",
    "Slot",
    "SlotPool",
    "common_prefix",
    "prompt_pieces",
    "render_chat",
    "reply_for",
    "token_id",
    "tokenize",
    "valid_slot_filename",
]

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# Markers first, so each is one token as in a real vocabulary; then words,
# runs of whitespace, and every other character on its own. Every character
# lands in exactly one token, so joining the pieces gives the text back.
_TOKEN_PATTERN = re.compile(
    rf"{re.escape(BOS)}|{re.escape(START_OF_TURN)}|{re.escape(END_OF_TURN)}|\w+|\s+|[^\w\s]"
)
_QUOTE_LIMIT = 60


def tokenize(text: str) -> list[str]:
    """Split ``text`` into token pieces; ``"".join(tokenize(t)) == t`` always."""
    return _TOKEN_PATTERN.findall(text)


def token_id(piece: str) -> int:
    """A stable id for one piece (the same in every process, unlike ``hash``)."""
    # surrogatepass: a lone surrogate is a piece too and must not crash the server.
    return zlib.crc32(piece.encode("utf-8", "surrogatepass"))


def common_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many tokens two token lists share from their start."""
    shared = 0
    for a, b in zip(cached, prompt, strict=False):
        if a != b:
            break
        shared += 1
    return shared


def render_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """Render messages as llama.cpp's built-in Gemma template does.

    The system message is folded into the first user turn, every message is
    trimmed, ``assistant`` is called ``model``, and the prompt ends with the
    opening of the model's turn. Trimming is part of the trap the bridge must
    avoid: a stored reply with trailing whitespace no longer matches the
    tokens the slot cached for it. The text has no BOS: as on llama.cpp's
    ``/apply-template``, the tokenizer adds it (see :func:`prompt_pieces`).
    """
    parts: list[str] = []
    pending_system = ""
    for message in messages:
        role = message["role"]
        content = message["content"].strip()
        if role == "system":
            pending_system += content + "\n\n"
            continue
        if role == "user" and pending_system:
            content = pending_system + content
            pending_system = ""
        speaker = "model" if role == "assistant" else role
        parts.append(f"{START_OF_TURN}{speaker}\n{content}{END_OF_TURN}\n")
    if pending_system:
        # A system message alone still reaches the model, as a user turn.
        parts.append(f"{START_OF_TURN}user\n{pending_system.strip()}{END_OF_TURN}\n")
    parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


def prompt_pieces(messages: Sequence[Mapping[str, str]]) -> list[str]:
    """The token pieces of the rendered prompt, BOS first."""
    return [BOS, *tokenize(render_chat(messages))]


def reply_for(messages: Sequence[Mapping[str, str]]) -> str:
    """The deterministic responder: a reply that says what history it was sent.

    ``Reply N`` counts the user messages (the conversation's turn number);
    the earlier messages are every user and assistant message before the last
    one, so a test can tell a full history from a trimmed or a missing one.
    """
    dialogue = [m for m in messages if m["role"] != "system"]
    turn = sum(1 for m in dialogue if m["role"] == "user")
    last_user = next((m["content"] for m in reversed(dialogue) if m["role"] == "user"), "")
    quoted = " ".join(last_user.split())
    if len(quoted) > _QUOTE_LIMIT:
        quoted = quoted[: _QUOTE_LIMIT - 3] + "..."
    earlier = max(len(dialogue) - 1, 0)
    return f"Reply {turn}: I see {earlier} earlier messages; you said: {quoted}"


def valid_slot_filename(name: str) -> bool:
    """Whether llama.cpp would accept ``name`` as a slot file name.

    Like its ``fs_validate_filename``: no path separators or characters that
    are reserved on some file system, no control characters, no ``.`` or
    ``..`` (or ``..`` anywhere), no leading or trailing space, no trailing dot,
    at most 255 bytes. Anything else could escape ``--slot-save-path``.
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > 255:
        return False
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch in '/\\:*?"<>|' for ch in name):
        return False
    if ".." in name or name == ".":
        return False
    return not (name[0] == " " or name[-1] in " .")


@dataclass
class Slot:
    """One slot: the tokens its prompt cache holds and whether a request runs in it."""

    id: int
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    # 0 = never used, so an untouched slot counts as the least recently used.
    last_used: int = 0


class SlotPool:
    """The slots of one server, handed out to one request at a time each.

    A request that finds no slot it may use waits until one is released, as
    llama.cpp defers a task while every slot is busy.
    """

    def __init__(self, total_slots: int) -> None:
        if total_slots < 1:
            raise ValueError(f"total_slots must be at least 1, not {total_slots}")
        self.slots = [Slot(id=index) for index in range(total_slots)]
        self._clock = 0
        self._released = asyncio.Condition()

    def forget(self) -> None:
        """Drop every slot's cache (a restart); a running request keeps its slot."""
        for slot in self.slots:
            slot.tokens = []
            slot.last_used = 0

    def choose(self, prompt: Sequence[int], similarity: float) -> Slot | None:
        """The idle slot a request without ``id_slot`` gets, or None when all are busy."""
        idle = [slot for slot in self.slots if not slot.busy]
        if not idle:
            return None
        best = max(idle, key=lambda slot: common_prefix(slot.tokens, prompt))
        shared = common_prefix(best.tokens, prompt)
        if prompt and shared / len(prompt) > similarity:
            return best
        return min(idle, key=lambda slot: slot.last_used)

    async def acquire(self, id_slot: int | None, prompt: Sequence[int], similarity: float) -> Slot:
        """Wait for the named slot (or a suitable idle one) and mark it busy."""
        async with self._released:
            while True:
                if id_slot is None:
                    slot = self.choose(prompt, similarity)
                else:
                    named = self.slots[id_slot]
                    slot = None if named.busy else named
                if slot is not None:
                    slot.busy = True
                    return slot
                await self._released.wait()

    async def release(self, slot: Slot) -> None:
        """Give the slot back, stamped as the most recently used."""
        async with self._released:
            self._clock += 1
            slot.last_used = self._clock
            slot.busy = False
            self._released.notify_all()
