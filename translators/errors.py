"""Errors of the pure translators. The proxy maps them onto its own tree.

    TranslationError
    ├── ToolsetError      the request's tools cannot be used (bad schema, duplicate names)
    ├── OutputError       the model's output is not the agreed shape (fit to send back for repair)
    └── CallError         a program calls a tool wrongly (unknown name, bad arguments)

Messages are written for the reader who can fix the problem: the client for
ToolsetError, the model for OutputError and CallError.
"""

from __future__ import annotations

__all__ = ["CallError", "OutputError", "ToolsetError", "TranslationError"]


class TranslationError(ValueError):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ToolsetError(TranslationError):
    pass


class OutputError(TranslationError):
    pass


class CallError(TranslationError):
    pass
