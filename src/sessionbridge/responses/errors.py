"""The errors only the Responses API raises, in the bridge's error family.

    Unsupported              400 unsupported               a field or item type the
                             bridge does not serve (tools, images, function calls)
    ContextLengthExceeded    400 context_length_exceeded   with ``truncation: "disabled"``,
                             a context that cannot fit the AI server's budget

Both name the request field they are about (``param``), which OpenAI's error
object shows. Field errors themselves stay :class:`~sessionbridge.errors.InvalidField`
(its first field is the ``param``); the OpenAI face answers them with 400.
"""

from __future__ import annotations

from ..errors import BridgeError


class Unsupported(BridgeError):
    status, code, title = 400, "unsupported", "Not supported by this server"

    # ``param`` is a keyword so that ``error_from_code`` (which builds an error
    # from a stored code and message alone) can build this one too.
    def __init__(self, detail: str, *, param: str | None = None) -> None:
        super().__init__(detail)
        self.param = param


class ContextLengthExceeded(BridgeError):
    status, code, title = 400, "context_length_exceeded", "The context does not fit"

    def __init__(self, detail: str, *, param: str | None = "input") -> None:
        super().__init__(detail)
        self.param = param
