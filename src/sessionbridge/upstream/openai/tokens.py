"""Token counts of scenarios and messages, each text counted once.

A turn counts its scenario and message twice (before the question is stored,
then to plan the prompt), and a scenario every turn; the counts are kept by a
digest of the text. Exact where the server tokenizes (llama.cpp's
``/tokenize``), else estimated from bytes: the bridge has no tokenizer of its own.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

# Token counts of recent scenarios and messages.
TOKEN_COUNT_CACHE = 512


class TokenCounts:
    def __init__(self, ask: Callable[[str], Awaitable[int]], size: int = TOKEN_COUNT_CACHE) -> None:
        self._ask = ask
        self._size = size
        self._counts: OrderedDict[bytes, int] = OrderedDict()

    async def count(self, text: str) -> int:
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        known = self._counts.get(key)
        if known is not None:
            self._counts.move_to_end(key)
            return known
        count = await self._ask(text)
        self._counts[key] = count
        if len(self._counts) > self._size:
            self._counts.popitem(last=False)
        return count
