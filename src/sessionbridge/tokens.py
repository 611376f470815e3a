"""API tokens: how they are made and the hash that is stored in their place."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "sb_"


def new_token() -> str:
    """A fresh bearer token with 256 bits from the system's CSPRNG."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    # A plain SHA-256 suffices: tokens are random, not passwords, so there is
    # nothing to guess that a slow hash would protect. The lookup is by hash,
    # so no comparison on the token itself ever happens.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
