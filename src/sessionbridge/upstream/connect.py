"""The adapter for the configured AI-server flavor, over the app's one HTTP client session.

One URL: that flavor's adapter, as it always was. Several (replicas of one
AI server): one adapter per replica inside a pool (``replicas.py``).
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..config import Settings
from ..metrics import Metrics
from .base import AIServer
from .openai import OpenAIClient
from .replica_health import Replica, ReplicaAdapter
from .replicas import ReplicaPool
from .sessions import SessionServerClient
from .slots import SlotFiles


def connect(http: aiohttp.ClientSession, settings: Settings, metrics: Metrics) -> AIServer:
    """The adapter for the configured flavor, over the app's one client session."""
    urls = settings.upstream_urls
    if len(urls) <= 1:
        return adapter(http, settings, metrics, settings.upstream_url)
    replicas = []
    for url in urls:
        rid = replica_id(shown(url))
        replicas.append(Replica(rid, shown(url), adapter(http, settings, metrics, url, rid)))
    return ReplicaPool(
        replicas,
        metrics,
        load_factor=settings.replica_load_factor,
        ready_grace=settings.ready_grace,
    )


def replica_id(url: str) -> str:
    """A replica's id in conversations' states and slot file names: 8 hex digits of its URL."""
    return hashlib.blake2b(url.encode("utf-8"), digest_size=4).hexdigest()


def shown(url: str) -> str:
    """The URL as logs, metrics and /readyz show it: without any credentials in it."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=host))


def adapter(
    http: aiohttp.ClientSession, settings: Settings, metrics: Metrics, url: str, replica: str = ""
) -> ReplicaAdapter:
    """The flavor's adapter for one AI server; ``replica`` names its slot files among several."""
    if settings.upstream_flavor == "openai":
        slot_files = None
        if settings.slot_save == "on":
            slot_files = SlotFiles(settings.slot_dir, settings.slot_files, replica)
        return OpenAIClient(
            http,
            url,
            model=settings.upstream_model,
            api_key=settings.upstream_api_key,
            context_tokens=settings.context_tokens,
            timeout=settings.upstream_timeout,
            max_reply_bytes=settings.max_reply_bytes,
            slot_files=slot_files,
            observe=metrics.observe_upstream,
            count_slot_action=metrics.count_slot_action,
        )
    return SessionServerClient(
        http,
        url,
        flavor=settings.upstream_flavor,
        user=settings.upstream_user,
        password=settings.upstream_password,
        timeout=settings.upstream_timeout,
        recovery_budget=settings.recovery_budget,
        max_reply_bytes=settings.max_reply_bytes,
        observe=metrics.observe_upstream,
    )
