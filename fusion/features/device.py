"""One code path for CPU and CUDA: device choice, host-to-device copies and mixed precision.

Extraction and training call these instead of branching on the device themselves, so the CUDA path
(bf16 autocast, pinned host memory, non-blocking copies that overlap the next batch's reading) is the
same code that the CPU tests run; on a CPU each helper reduces to the plain fp32 operation.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU; any other string is taken as a torch device name."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pinned(device: torch.device) -> bool:
    """Whether host buffers bound for `device` should be page-locked (only CUDA gains from it)."""
    return device.type == "cuda"


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor to fill before copying to `device`: pinned when the copy can then be async."""
    return torch.empty(shape, dtype=dtype, pin_memory=pinned(device))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to `device`; from pinned memory the copy is non-blocking (it overlaps host work on CUDA).
    A tensor already there is returned as it is."""
    if x.device == device:
        return x
    if pinned(device) and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=pinned(device))


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """bf16 autocast on CUDA (half the memory traffic, tensor cores), fp32 on CPU; `precision` "bf16" or
    "fp32" forces either (bf16 on a CPU runs the CUDA path's numerics where there is no GPU, e.g. in tests)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got '{precision}'")
    enabled = device.type == "cuda" if precision == "auto" else precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
