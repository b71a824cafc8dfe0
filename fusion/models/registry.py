"""Model registry (timm-style): `@register_model("name")` on a builder; `create_model(name, ...)`.

Every model takes a `Bag` batch and returns a dict with at least `risk` [B] (survival) or
`logits` [B, C] (classification), plus `attention` [B, N] where the model attends over tiles.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model '{name}'; available: {', '.join(available_models())}")
    return _REGISTRY[name](**kwargs)


from fusion.models import abmil, acmil, biofusion, coattn, snn  # noqa: E402,F401  (registers)
