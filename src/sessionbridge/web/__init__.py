"""Every HTTP face of the bridge; the only package that knows HTTP requests (docs/internals.md).

    api.py              the sessions API (/v1/sessions ...)
    events.py           a turn's events as Server-Sent Events
    openai/             the OpenAI face (/v1/responses, /v1/conversations, /v1/models)
    ops.py              /healthz, /readyz, /metrics
    openapi.py          /openapi.json
    page.py, static/    the web page
    problems.py         errors as problem+json
    auth.py             bearer tokens on /v1
    request_metrics.py  requests counted and timed by route
    connections.py      the connection cap and the header deadline
    jsonhttp.py         JSON answers
    appkeys.py          every typed key of the app's state
"""

from __future__ import annotations
