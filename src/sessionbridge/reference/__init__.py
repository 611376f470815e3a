"""The reference AI servers: stand-ins for the protocols the bridge speaks (NOT models).

    seed_server.py    the seed protocol, both generations (``scenario``, ``init-session``)
    openai_server.py  an OpenAI-compatible server with llama.cpp, vLLM and Ollama personas
    openai_cache.py   its simulated per-slot prompt cache and token counts
    openai_wire.py    its answers on the wire (JSON bodies and streamed chunks)

``make run`` starts one so a new bridge works out of the box, and the tests
run them as real processes on real sockets. Nothing in the bridge imports
them: they are apart from the real adapters in ``upstream/``.
"""
