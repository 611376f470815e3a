"""Every typed key of the application and request state, in one place."""

from __future__ import annotations

from aiohttp import web

from ..config import Settings
from ..conversation import Conversations
from ..metrics import Metrics
from ..readiness import ReadinessProbe
from ..records import ApiKey
from ..responses.conversations import ConversationService
from ..responses.replays import Replays
from ..responses.service import Responses
from ..store import Store
from ..upstream import AIServer

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", Store)
AI_SERVER = web.AppKey("ai_server", AIServer)
CONVERSATIONS = web.AppKey("conversations", Conversations)
READINESS = web.AppKey("readiness", ReadinessProbe)
RESPONSES = web.AppKey("responses", Responses)
CONVERSATION_SERVICE = web.AppKey("conversation_service", ConversationService)
REPLAYS = web.AppKey("replays", Replays)

API_KEY = web.RequestKey("api_key", ApiKey)
