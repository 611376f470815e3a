"""A conversation's state over several replicas: which of them hold it, and what each keeps.

One AI session per replica: the state the bridge stores for a conversation
(``TurnContext.state``) becomes, with several replicas,

    replicas/1 {"held": {"<replica id>": "<that replica's adapter state>", ...},
                "home": "<replica id>"}

where ``home`` is the replica its first turn was placed on (where it goes
while that one takes turns), and ``held`` lists the replicas whose AI session holds **every answered
turn** of the conversation, each with its adapter's own state (the seed
protocol's AI session id there, the OpenAI adapter's window). When a turn is
answered on one replica every other entry goes: their AI sessions now lack
that turn, and an AI session is reused only where nothing was answered
elsewhere since. A replica that was merely out (busy, unreachable) and still
holds the old session is therefore recovered, never reused stale. A session
created on a replica whose turn then failed stays listed beside the one it
was recovered from: both still hold every answered turn.

In the steady state (every turn answered where the last one was) the state
does not change and a turn writes nothing. A state without the prefix was
written with one AI server: no replica is known to hold it, and what it says
is handed on as it is (the OpenAI adapter's window start).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import jsoncodec
from ..records import ChatSession, HistoryTurn
from .base import TurnContext

# A space never occurs in an AI session id (a cookie token) nor in "from=N".
PREFIX = "replicas/1 "


@dataclass
class Held:
    """The replicas that hold every answered turn, with their adapters' states."""

    entries: dict[str, str] = field(default_factory=dict)
    # A state written with one AI server (no prefix): held by no replica here.
    single: str | None = None
    # The replica the conversation was placed on; None until it is placed.
    home: str | None = None
    _home_set: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def parse(cls, state: str | None) -> Held:
        if state is None:
            return cls()
        if not state.startswith(PREFIX):
            return cls(single=state)
        try:
            document = jsoncodec.loads(state[len(PREFIX) :].encode("utf-8"))
            held = document["held"]
        except (ValueError, RecursionError, TypeError, KeyError):
            held = None
        if not isinstance(held, dict):
            # Unreadable: held by no replica, and not a first turn either.
            return cls(single=state)
        home = document.get("home")
        return cls(
            {k: v for k, v in held.items() if isinstance(k, str) and isinstance(v, str)},
            home=home if isinstance(home, str) else None,
        )

    def encode(self) -> str:
        self._home_set = False  # stored with what is encoded now
        document: dict[str, object] = {"held": self.entries}
        if self.home is not None:
            document["home"] = self.home
        return PREFIX + jsoncodec.dumps(document).decode("utf-8")

    def settle(self, replica: str) -> None:
        """The conversation is placed on ``replica``: its home, unless it has one."""
        if self.home is None:
            self.home = replica
            self._home_set = True

    @property
    def empty(self) -> bool:
        """Nothing was ever kept: the conversation's first turn."""
        return not self.entries and self.single is None

    def carried(self) -> str | None:
        """A state to start from on a replica that holds nothing current of the conversation."""
        for state in self.entries.values():
            return state
        return self.single

    def answered_on(self, replica: str, state: str) -> bool:
        """A turn was answered on ``replica``: only it holds every turn now. Changed?"""
        home_set, self._home_set = self._home_set, False
        if self.single is None and self.entries == {replica: state}:
            return home_set
        self.entries = {replica: state}
        self.single = None
        return True


class ReplicaTurn:
    """The TurnContext one replica's adapter sees: its own state within the conversation's."""

    def __init__(self, outer: TurnContext, held: Held, replica: str, state: str | None) -> None:
        self._outer = outer
        self._held = held
        self._replica = replica
        self._state = state
        self.session: ChatSession = outer.session
        self.content = outer.content
        self.max_tokens = outer.max_tokens
        self.sampling = outer.sampling
        self.trim = outer.trim
        self.affinity_key = outer.affinity_key

    @property
    def state(self) -> str | None:
        return self._state

    async def save_state(self, state: str) -> None:
        self._state = state
        self._held.entries[self._replica] = state
        await self._outer.save_state(self._held.encode())
        self.session = self._outer.session

    async def history(self, from_seq: int = 0) -> list[HistoryTurn]:
        return await self._outer.history(from_seq)

    def withdraw_reply(self) -> bool:
        return self._outer.withdraw_reply()

    async def answered(self) -> None:
        """This replica answered the turn: record that only it holds every turn now."""
        if self._state is not None and self._held.answered_on(self._replica, self._state):
            await self._outer.save_state(self._held.encode())
            self.session = self._outer.session
