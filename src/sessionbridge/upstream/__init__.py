"""The AI-server side: one interface, one module per protocol family (docs/ai-servers.md).

    base.py            the interface a conversation needs from any AI server (no HTTP in it)
    http.py            what every adapter does on the wire: error mapping, bounded reads
    sessions.py        the seed protocol, both generations (scenario, init-session)
    openai/            OpenAI-compatible chat completions (llama.cpp, vLLM, Ollama ...)
    slots.py           llama.cpp's slot files, one per conversation
    connect.py         the adapter for the configured flavor (a pool for several URLs)
    replicas.py        several replicas of one AI server answering as one: affinity, failover
    placement.py       where a conversation goes among them (rendezvous hashing, a load bound)
    replica_state.py   which replicas hold every answered turn of a conversation
    replica_health.py  when a replica is out, and when it is back

Importing this package loads only the interface: the conversation rules
import it and must not load an HTTP library. The reference servers that
stand in for an AI server in ``make run`` and the tests are in
``sessionbridge.reference``.
"""

from __future__ import annotations

from .base import AIServer, DeltaSink, HealthReport, ReplicaHealth, Reply, TurnContext

__all__ = ["AIServer", "DeltaSink", "HealthReport", "ReplicaHealth", "Reply", "TurnContext"]
