"""How each persona of the reference OpenAI-compatible server words its answers.

A private part of :mod:`.reference_openai` (a test double, NOT a model): the
JSON bodies, stream chunks and error bodies of llama.cpp's ``llama-server``,
vLLM and Ollama, as they were read from their sources and, for llama.cpp,
compared with a running ``llama-server`` (11434.0.0). Nothing here does I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from .openai_cache import tokenize

JSONObject = dict[str, Any]


class Rejected(Exception):
    """An answer other than success; the middleware sends it."""

    def __init__(self, status: int, body: JSONObject | str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def dumps(value: object) -> str:
    # Raw UTF-8 as the real servers send it; a lone surrogate (which UTF-8
    # cannot carry) goes out as a JSON escape instead of crashing the server.
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def error(kind: str, status: int, message: str, error_type: str | None = None) -> Rejected:
    """An error in the persona's own body shape."""
    if kind == "llama.cpp":
        llama_types = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            501: "not_supported_error",
            503: "unavailable_error",
        }
        kind_type = error_type or llama_types.get(status, "server_error")
        return Rejected(status, {"error": {"code": status, "message": message, "type": kind_type}})
    if kind == "vllm":
        phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
        vllm_type = error_type or (phrase if phrase.endswith("Error") else phrase + "Error")
        vllm_error = {"message": message, "type": vllm_type, "param": None, "code": status}
        return Rejected(status, {"error": vllm_error})
    ollama_type = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    ollama_error = {"message": message, "type": error_type or ollama_type, "param": None}
    return Rejected(status, {"error": ollama_error | {"code": None}})


def not_found(kind: str) -> Rejected:
    # What each server's router answers for a path it does not serve.
    if kind == "llama.cpp":
        return error(kind, 404, "File Not Found")
    if kind == "vllm":
        return Rejected(404, {"detail": "Not Found"})
    return Rejected(404, "404 page not found")


def unauthorized(kind: str) -> Rejected:
    if kind == "llama.cpp":
        return error(kind, 401, "Invalid API Key")
    if kind == "vllm":
        return Rejected(401, {"error": "Unauthorized"})
    return error(kind, 401, "Invalid API key", "invalid_request_error")


@dataclass
class Turn:
    """One chat completion as it is being answered, in one persona's words."""

    kind: str
    model: str
    id: str
    created: int
    prompt: list[int]
    cache_n: int
    pieces: list[str]
    finish_reason: str
    include_usage: bool
    prompt_token_delay: float
    piece_delay: float
    # The start of the reply the request gave (llama.cpp's prefill), which
    # llama.cpp's answer repeats in front of what it generated.
    echo: str = ""

    @property
    def prompt_n(self) -> int:
        return len(self.prompt) - self.cache_n

    @property
    def predicted_n(self) -> int:
        return sum(len(tokenize(piece)) for piece in self.pieces)


def timings(turn: Turn) -> JSONObject:
    # Simulated, not measured: the figures follow from the delays, so they
    # are the same on a loaded machine.
    prompt_ms = turn.prompt_n * turn.prompt_token_delay * 1000
    predicted_ms = len(turn.pieces) * turn.piece_delay * 1000

    def per_token(ms: float, n: int) -> tuple[float, float]:
        return (ms / n if n else 0.0), (n * 1000 / ms if ms else 0.0)

    prompt_per_token, prompt_per_second = per_token(prompt_ms, turn.prompt_n)
    predicted_per_token, predicted_per_second = per_token(predicted_ms, turn.predicted_n)
    return {
        "cache_n": turn.cache_n,
        "prompt_n": turn.prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_per_token,
        "prompt_per_second": prompt_per_second,
        "predicted_n": turn.predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_per_token,
        "predicted_per_second": predicted_per_second,
    }


def usage(turn: Turn) -> JSONObject:
    if turn.kind == "ollama":
        # Ollama counts what it evaluated, so a cached prefix is missing here.
        prompt_tokens = turn.prompt_n
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": turn.predicted_n,
            "total_tokens": prompt_tokens + turn.predicted_n,
        }
    return {
        "completion_tokens": turn.predicted_n,
        "prompt_tokens": len(turn.prompt),
        "total_tokens": len(turn.prompt) + turn.predicted_n,
        "prompt_tokens_details": {"cached_tokens": turn.cache_n},
    }


def completion_body(turn: Turn) -> JSONObject:
    message = {"role": "assistant", "content": turn.echo + "".join(turn.pieces)}
    choice: JSONObject = {"index": 0, "message": message, "finish_reason": turn.finish_reason}
    body: JSONObject = {
        "id": turn.id,
        "object": "chat.completion",
        "created": turn.created,
        "model": turn.model,
        "choices": [choice],
        "usage": usage(turn),
    }
    if turn.kind == "llama.cpp":
        body |= {"system_fingerprint": "reference-test-double", "timings": timings(turn)}
    elif turn.kind == "vllm":
        choice |= {"logprobs": None, "stop_reason": None}
        body["system_fingerprint"] = None
    else:
        body["system_fingerprint"] = "fp_ollama"
    return body


def _chunk(turn: Turn, choices: list[JSONObject]) -> JSONObject:
    chunk: JSONObject = {
        "id": turn.id,
        "object": "chat.completion.chunk",
        "created": turn.created,
        "model": turn.model,
        "choices": choices,
    }
    if turn.kind == "llama.cpp":
        chunk["system_fingerprint"] = "reference-test-double"
    elif turn.kind == "ollama":
        chunk["system_fingerprint"] = "fp_ollama"
    return chunk


def _delta(kind: str, delta: JSONObject, finish: str | None) -> JSONObject:
    choice: JSONObject = {"index": 0, "delta": delta, "finish_reason": finish}
    if kind == "vllm":
        choice["logprobs"] = None
    return choice


def head_chunks(turn: Turn) -> list[JSONObject]:
    if turn.kind == "ollama":
        # Ollama's first chunk already carries text; there is no role-only one.
        return []
    empty = None if turn.kind == "llama.cpp" else ""
    return [_chunk(turn, [_delta(turn.kind, {"role": "assistant", "content": empty}, None)])]


def piece_chunk(turn: Turn, piece: str) -> JSONObject:
    delta: JSONObject = {"content": piece}
    if turn.kind == "ollama":
        delta = {"role": "assistant", "content": piece}
    return _chunk(turn, [_delta(turn.kind, delta, None)])


def tail_chunks(turn: Turn) -> list[JSONObject]:
    if turn.kind == "llama.cpp":
        closing: JSONObject = {}
    elif turn.kind == "ollama":
        closing = {"role": "assistant", "content": ""}
    else:
        closing = {"content": ""}
    choice = _delta(turn.kind, closing, turn.finish_reason)
    if turn.kind == "vllm":
        choice["stop_reason"] = None
    chunks = [_chunk(turn, [choice])]
    if turn.include_usage:
        chunks.append(_chunk(turn, []) | {"usage": usage(turn)})
    if turn.kind == "llama.cpp":
        chunks[-1]["timings"] = timings(turn)
    return chunks


def sse(chunk: JSONObject | str) -> bytes:
    data = chunk if isinstance(chunk, str) else dumps(chunk)
    return f"data: {data}\n\n".encode("utf-8", "surrogatepass")
