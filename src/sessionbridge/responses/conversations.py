"""The OpenAI face's conversations: a conversation is a session, its items are its messages.

Every conversation is listed by the sessions API and shown on the page, and
a session's id may be given wherever a conversation's is. A conversation's
items are its answered messages, oldest first: what clients added, and the
questions and answers of its responses once they completed (a failed or
cancelled response adds nothing).
"""

from __future__ import annotations

import json

from ..conversation import Conversations
from ..errors import NotFound, Unsupported
from ..records import ApiKey, ChatSession, ContextMessage, Message
from ..store.base import Store
from .records import (
    CONVERSATION_ID_PREFIX,
    ConversationCreate,
    ConversationRecord,
    InputMessage,
    Item,
    Page,
    PageRequest,
)
from .service import new_id, unix_seconds


def item_of(message: Message) -> Item:
    return Item(message.id, message.role, (message.content,))


def context_of(items: tuple[InputMessage, ...], param: str) -> list[ContextMessage]:
    """Items to store; only user and assistant messages are a conversation's (no system items)."""
    stored = []
    for index, item in enumerate(items):
        if item.role not in ("user", "assistant"):
            raise Unsupported(
                f"a conversation holds user and assistant items, not {item.role}",
                param=f"{param}[{index}].role",
            )
        stored.append(ContextMessage(item.role, item.text))
    return stored


class ConversationService:
    def __init__(self, store: Store, conversations: Conversations, max_tokens: int) -> None:
        self._store = store
        self._conversations = conversations
        self._max_tokens = max_tokens

    @staticmethod
    def record_of(session: ChatSession) -> ConversationRecord:
        metadata = json.loads(session.metadata) if session.metadata else {}
        return ConversationRecord(
            session.id, session.api_key_id, unix_seconds(session.created_at), metadata
        )

    async def _session(self, key: ApiKey, conversation_id: str) -> ChatSession:
        session = await self._store.get_session(key.id, conversation_id)
        if session is None:
            raise NotFound(f"no conversation {conversation_id}")
        return session

    async def create(self, key: ApiKey, request: ConversationCreate) -> ConversationRecord:
        session = await self._store.create_session(
            key.id, None, "", self._max_tokens,
            session_id=new_id(CONVERSATION_ID_PREFIX),
            kind="conversation",
            metadata=json.dumps(dict(request.metadata), ensure_ascii=False),
            items=context_of(request.items, "items"),
        )
        return self.record_of(session)

    async def get(self, key: ApiKey, conversation_id: str) -> ConversationRecord:
        return self.record_of(await self._session(key, conversation_id))

    async def update(
        self, key: ApiKey, conversation_id: str, metadata: dict[str, str]
    ) -> ConversationRecord:
        session = await self._session(key, conversation_id)
        encoded = json.dumps(metadata, ensure_ascii=False)
        await self._store.set_metadata(session.pk, encoded)
        return ConversationRecord(
            session.id, session.api_key_id, unix_seconds(session.created_at), metadata
        )

    async def delete(self, key: ApiKey, conversation_id: str) -> None:
        session = await self._session(key, conversation_id)
        if not await self._store.delete_session(key.id, session.id):
            raise NotFound(f"no conversation {conversation_id}")
        await self._conversations.deleted(session)

    async def add_items(
        self, key: ApiKey, conversation_id: str, items: tuple[InputMessage, ...]
    ) -> list[Item]:
        session = await self._session(key, conversation_id)
        added = await self._store.add_items(session.pk, context_of(items, "items"))
        return [item_of(message) for message in added]

    async def list_items(self, key: ApiKey, conversation_id: str, page: PageRequest) -> Page:
        session = await self._session(key, conversation_id)
        items = [item_of(m) for m in await self._store.answered_since(session.pk, 1)]
        return paged(items, page)

    async def get_item(self, key: ApiKey, conversation_id: str, item_id: str) -> Item:
        session = await self._session(key, conversation_id)
        message = await self._store.get_message_by_id(session.pk, item_id)
        if message is None or message.status != "answered":
            raise NotFound(f"no item {item_id} in conversation {conversation_id}")
        return item_of(message)

    async def delete_item(
        self, key: ApiKey, conversation_id: str, item_id: str
    ) -> ConversationRecord:
        session = await self._session(key, conversation_id)
        if not await self._store.delete_message(session.pk, item_id):
            raise NotFound(f"no item {item_id} in conversation {conversation_id}")
        return self.record_of(session)


def paged(items: list[Item], page: PageRequest) -> Page:
    """One page of ``items`` (oldest first as given) in the page's order, after its cursor."""
    ordered = items if page.order == "asc" else list(reversed(items))
    if page.after is not None:
        ids = [item.id for item in ordered]
        if page.after not in ids:
            raise NotFound(f"no item {page.after} in this list")
        ordered = ordered[ids.index(page.after) + 1:]
    return Page(tuple(ordered[: page.limit]), len(ordered) > page.limit)
