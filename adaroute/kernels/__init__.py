"""Kernel registry: one module per kernel, looked up by name.

Every kernel module exposes the same functions (see ``reference``, the ground truth):
``linear``, ``linear_multi``, ``gate_up_silu``, ``rmsnorm``, ``dense_ffn``, ``unit_ffn``,
``routed_ffn``, ``head_rows`` and ``is_available``. Modules are imported on first lookup, so asking for the CPU
kernel builds it then, and nothing GPU-related is imported on a CPU-only machine.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_KERNELS = {
    "reference": "adaroute.kernels.reference",
    "cpu": "adaroute.kernels.cpu",
    "triton": "adaroute.kernels.triton_gpu",
}


def known_kernels() -> list[str]:
    return sorted(_KERNELS)


def get_kernel(name: str) -> ModuleType:
    """The kernel module registered as ``name``; ValueError for unknown names."""
    if name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; known kernels: {', '.join(known_kernels())}")
    return importlib.import_module(_KERNELS[name])


def default_kernel(device: str = "cpu") -> ModuleType:
    """The fastest kernel available for ``device``."""
    if device.startswith("cuda"):
        return get_kernel("triton")
    kernel = get_kernel("cpu")
    return kernel if kernel.is_available() else get_kernel("reference")
