"""Model backends: one ABC, three real implementations."""

from proxy.backends.base import ModelBackend, SSEStream, error_from_upstream

__all__ = ["ModelBackend", "SSEStream", "error_from_upstream"]
