"""Model registry (timm-style): `@register_model("name", options=(...))` on a builder; `create_model(name, ...)`.

Every model takes the inputs listed in `fusion.models.base` and returns a dict with at least
`risk` [B] (survival) or `logits` [B, C] (classification), plus `attention` [B, N] over tiles.
`options` are the builder's own settings a user may set (`TrainConfig.model_options`, a pipeline
config's `model_options:`); anything else is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_model(name: str, options: tuple[str, ...] = ()):
    """Register a builder under `name`; `options` are the keyword settings users may pass to it."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = fn
        _OPTIONS[name] = tuple(options)
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def model_options(name: str) -> tuple[str, ...]:
    """The user-settable options of model `name`."""
    return _OPTIONS[name]


def check_model_options(name: str, options: dict) -> None:
    """Refuse options that model `name` does not have, naming them and the ones it has."""
    unknown = sorted(set(options) - set(_OPTIONS.get(name, ())))
    if unknown:
        known = ", ".join(_OPTIONS.get(name, ())) or "none"
        raise ValueError(f"model '{name}' has no option(s) {', '.join(unknown)}; its options: {known}")


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model '{name}'; available: {', '.join(available_models())}")
    return _REGISTRY[name](**kwargs)


from fusion.models import abmil, acmil, biofusion, coattn, snn  # noqa: E402,F401  (registers)
