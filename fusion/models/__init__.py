"""MIL and fusion models. Models see tensors only, never files."""

from fusion.models.registry import available_models, create_model, register_model

__all__ = ["available_models", "create_model", "register_model"]
