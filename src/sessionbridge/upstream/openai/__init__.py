"""OpenAI-compatible chat completions: llama.cpp, vLLM, Ollama and the like (docs/ai-servers.md).

These servers keep no conversation: every turn sends the whole history, and
the server saves work only where it finds that history's beginning in its
prompt cache. So the bridge is the memory, and "reusing the AI session" means
sending a prompt whose beginning is byte for byte the previous turn's.

    client.py      OpenAIClient: discovery, health, one turn, llama.cpp slot actions
    window.py      the history window: the messages sent, trimming in steps, ai_session
    wire.py        answers on the wire: JSON bodies, streamed chunks, refusals, usage
    tokens.py      token counts, each text counted once
    slot_table.py  which conversation each llama.cpp slot holds

llama.cpp slot files (``..slots``) are used only with ``slot_save=on``.
"""

from __future__ import annotations

from .client import OpenAIClient, ServerInfo
from .window import build_messages, window_start

__all__ = ["OpenAIClient", "ServerInfo", "build_messages", "window_start"]
