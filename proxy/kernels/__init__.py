"""Kernels: pooled Jupyter kernels that run code actions, with a back-channel for tool calls."""

from proxy.kernels.base import (
    CellError,
    CellOutput,
    Finished,
    KernelConnection,
    KernelProvider,
    Pending,
    ToolRequest,
)
from proxy.kernels.execution import CellRun, ExecLimits, KernelDied
from proxy.kernels.pool import KernelPool, PooledKernel, PoolExhausted, PoolStats

__all__ = [
    "CellError",
    "CellOutput",
    "CellRun",
    "ExecLimits",
    "Finished",
    "KernelConnection",
    "KernelDied",
    "KernelPool",
    "KernelProvider",
    "Pending",
    "PoolExhausted",
    "PoolStats",
    "PooledKernel",
    "ToolRequest",
]
