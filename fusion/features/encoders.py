"""Encoder registry (timm-style): a name maps to a builder returning an `Encoder`.

An `Encoder` bundles the network with what it expects: input size in pixels, the resolution it
was trained at, normalisation, feature dimension, and a version string written beside every
feature file so stale features are never mixed with new ones. Every encoder takes uint8 RGB
tiles `[B, 3, H, W]` and returns float features `[B, D]`; normalisation happens inside, so the
data loader ships bytes (4x less memory traffic than float).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., Encoder]] = {}


@dataclass
class Encoder:
    name: str
    model: nn.Module  # uint8 [B, 3, H, W] -> float [B, D]
    input_size: int  # tiles are resized to input_size x input_size pixels
    dim: int
    version: str
    mpp: float | None = None  # resolution the encoder expects, if it has a preference

    def to(self, device: torch.device | str) -> Encoder:
        self.model.to(device)
        return self


def register_encoder(name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Decorator: register a builder `fn(**kwargs) -> Encoder` under `name`."""

    def wrap(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _REGISTRY:
            raise ValueError(f"encoder '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_encoders() -> list[str]:
    return sorted(_REGISTRY)


def create_encoder(name: str, **kwargs) -> Encoder:
    """Build a registered encoder; unknown names fail with the list of known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown encoder '{name}'; available: {', '.join(available_encoders())}")
    encoder = _REGISTRY[name](**kwargs)
    encoder.model.eval()
    return encoder


# Importing the modules registers their encoders.
from fusion.features import handcrafted  # noqa: E402,F401
