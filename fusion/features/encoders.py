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
from pathlib import Path

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
    """Build an encoder by name; unknown names fail with the list of known ones.

    Besides registered names: `timm:<arch>@<weights path>` (`@random` for untrained weights, for
    speed tests only), `<foundation>@<weights path>` (uni, uni2, virchow, phikon, hoptimus0) and
    `ssl@<folder>` for an encoder trained by `fusion pretrain`.
    """
    if "@" in name or name.startswith("timm:"):
        return _from_weights(name)
    if name not in _REGISTRY:
        raise ValueError(f"Unknown encoder '{name}'; available: {', '.join(available_encoders())}")
    encoder = _REGISTRY[name](**kwargs)
    encoder.model.eval()
    return encoder


def _from_weights(spec: str) -> Encoder:
    from fusion.features.pretrained import FOUNDATIONS, build_timm
    from fusion.storage import file_fingerprint

    head, _, weights = spec.partition("@")
    if head == "ssl":
        from fusion.features.ssl import load_ssl_encoder

        return load_ssl_encoder(weights)
    path = None if weights in ("", "random") else weights
    version = "random" if path is None else file_fingerprint(path) if Path(path).is_file() else "missing"
    if head.startswith("timm:"):
        arch = head[len("timm:"):]
        model, dim, size = build_timm(arch, path)
        return Encoder(f"timm-{arch}", model.eval(), input_size=size, dim=dim, version=f"{arch}-{version}")
    if head in FOUNDATIONS:
        if path is None:
            raise ValueError(f"encoder '{head}' needs its weights: '{head}@/path/to/weights'")
        f = FOUNDATIONS[head]
        model, dim, size = build_timm(f.arch, path, kwargs=f.kwargs, mean=f.mean, std=f.std,
                                      input_size=f.input_size, pool=f.pool)
        return Encoder(head, model.eval(), input_size=size, dim=dim, version=f"{head}-{version}", mpp=f.mpp)
    raise ValueError(f"Unknown encoder '{spec}'; use timm:<arch>@<path>, one of "
                     f"{', '.join(sorted(FOUNDATIONS))} as <name>@<path>, ssl@<folder>, or one of: "
                     f"{', '.join(available_encoders())}")


# Importing the modules registers their encoders.
from fusion.features import handcrafted  # noqa: E402,F401
