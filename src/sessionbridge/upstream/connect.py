"""The adapter for the configured AI-server flavor, over the app's one HTTP client session."""

from __future__ import annotations

import aiohttp

from ..config import Settings
from ..metrics import Metrics
from .base import AIServer
from .openai import OpenAIClient
from .sessions import SessionServerClient
from .slots import SlotFiles


def connect(http: aiohttp.ClientSession, settings: Settings, metrics: Metrics) -> AIServer:
    """The adapter for the configured flavor, over the app's one client session."""
    if settings.upstream_flavor == "openai":
        slot_files = None
        if settings.slot_save == "on":
            slot_files = SlotFiles(settings.slot_dir, settings.slot_files)
        return OpenAIClient(
            http,
            settings.upstream_url,
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
        settings.upstream_url,
        flavor=settings.upstream_flavor,
        user=settings.upstream_user,
        password=settings.upstream_password,
        timeout=settings.upstream_timeout,
        recovery_budget=settings.recovery_budget,
        max_reply_bytes=settings.max_reply_bytes,
        observe=metrics.observe_upstream,
    )
