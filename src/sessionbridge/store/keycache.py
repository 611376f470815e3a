"""Live API keys recently read, by token hash: every request needs its key.

A revocation through the same store clears the cache at once; one through
another process or bridge is seen once the entry is older than
``key_cache_seconds``. Unknown tokens are never cached, so a key created
elsewhere works at once.
"""

from __future__ import annotations

import time

from ..records import ApiKey

KEY_CACHE_SIZE = 1024


class KeyCache:
    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._keys: dict[bytes, tuple[ApiKey, float]] = {}

    def get(self, token_hash: bytes) -> ApiKey | None:
        cached = self._keys.get(token_hash)
        if cached is not None and time.monotonic() - cached[1] < self._seconds:
            return cached[0]
        return None

    def put(self, token_hash: bytes, key: ApiKey | None) -> None:
        """Remember a live key just read, or forget one that is no longer live."""
        if key is None:
            self._keys.pop(token_hash, None)
            return
        if self._seconds <= 0:
            return
        if len(self._keys) >= KEY_CACHE_SIZE:
            self._keys.clear()  # a crude bound; live keys are few
        self._keys[token_hash] = (key, time.monotonic())

    def clear(self) -> None:
        self._keys.clear()
