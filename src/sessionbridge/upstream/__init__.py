"""The AI-server side: one interface, one module per protocol family, and the reference doubles.

    base.py               the interface a conversation needs from any AI server
    sessions.py           the seed protocol, both generations (scenario, init-session)
    reference_sessions.py the reference AI server of the seed protocol (a test double)
"""

from __future__ import annotations

from .sessions import AIServer, HealthReport, SessionServerClient

__all__ = ["AIServer", "HealthReport", "SessionServerClient"]
