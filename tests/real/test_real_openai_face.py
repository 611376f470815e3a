"""The OpenAI face (docs/openai-api.md) with a real model, through the official openai SDK.

A chain of responses (``previous_response_id``) and a conversation, each a
few turns, against llama-server running SmolLM2-135M-Instruct: the replies
are the model's, every later turn's prompt is served from the prompt cache
(the history is sent byte for byte as stored), and a branch shares the
cached prefix of the line it branched from.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.conftest import Api

from .conftest import measured

pytestmark = pytest.mark.real

INSTRUCTIONS = "You are a friendly travel guide. Answer in one or two short sentences."


@pytest.fixture
async def sdk(api: Api) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=str(api.client.make_url("/v1")), api_key=api.token, max_retries=0
    )
    yield client
    await client.close()


def cached(response: openai.types.responses.Response) -> int:
    assert response.usage is not None
    return response.usage.input_tokens_details.cached_tokens


async def test_a_chain_of_responses_keeps_the_prompt_cache_warm(sdk: openai.AsyncOpenAI) -> None:
    questions = ["What should I see in Lisbon?", "And where should I eat?", "How do I get there?"]
    chain = []
    previous = None
    for question in questions:
        response = await sdk.responses.create(
            model="any", input=question, instructions=INSTRUCTIONS, previous_response_id=previous
        )
        chain.append(response)
        previous = response.id

    figures = [(r.usage.input_tokens, cached(r)) for r in chain if r.usage is not None]
    measured("responses chain", f"(prompt, cached) per turn: {figures}")
    assert all(r.status in ("completed", "incomplete") and r.output_text.strip() for r in chain)
    # Each later prompt begins with the whole earlier one: the cache served it.
    for before, after in itertools.pairwise(chain):
        assert before.usage is not None
        assert cached(after) >= before.usage.input_tokens
    # A branch from the first response: its prompt begins as the chain's did.
    branch = await sdk.responses.create(
        model="any", input="Is it expensive?", instructions=INSTRUCTIONS,
        previous_response_id=chain[0].id,
    )
    assert chain[0].usage is not None
    assert branch.usage is not None
    measured("responses branch", f"cached {cached(branch)} of {branch.usage.input_tokens}")
    assert cached(branch) >= chain[0].usage.input_tokens


async def test_a_conversation_streams_real_replies_and_stores_its_items(
    sdk: openai.AsyncOpenAI,
) -> None:
    conversation = await sdk.conversations.create(metadata={"trip": "Porto"})
    first = await sdk.responses.create(
        model="any", input="Hi! I am going to Porto.", instructions=INSTRUCTIONS,
        conversation=conversation.id,
    )
    deltas: list[str] = []
    ended: list[Any] = []
    # The stream ends with response.completed, or with response.incomplete
    # when the model runs into max_output_tokens (it sometimes rambles on to
    # 200 tokens): either is the whole reply.
    async with sdk.responses.stream(
        model="any", input="What is the best time to visit?", instructions=INSTRUCTIONS,
        conversation=conversation.id, max_output_tokens=200,
    ) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type in ("response.completed", "response.incomplete"):
                ended.append(event)
    (end,) = ended
    second = end.response
    if end.type == "response.incomplete":
        assert second.incomplete_details.reason == "max_output_tokens"

    assert "".join(deltas) == second.output_text and second.output_text.strip()
    assert first.usage is not None
    assert second.usage is not None
    measured("conversation", f"second turn cached {cached(second)} of {second.usage.input_tokens}")
    assert cached(second) >= first.usage.input_tokens
    items = [item async for item in sdk.conversations.items.list(conversation.id, order="asc")]
    roles = [getattr(item, "role", None) for item in items]
    assert roles == ["user", "assistant", "user", "assistant"]
