"""The action loop: tools as code, programs in kernels, OpenAI tool_calls out."""

from proxy.actions.loop import ActionLoop
from proxy.actions.runtime import LiveSession, Runtime
from proxy.actions.step import ToolCallOut

__all__ = ["ActionLoop", "LiveSession", "Runtime", "ToolCallOut"]
