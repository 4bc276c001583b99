"""The action loop: tools as code, programs in kernels, OpenAI tool_calls out."""

from proxy.actions.loop import ActionLoop, LoopResult, ToolCallOut
from proxy.actions.runtime import LiveSession, Runtime

__all__ = ["ActionLoop", "LiveSession", "LoopResult", "Runtime", "ToolCallOut"]
