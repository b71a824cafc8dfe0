"""What every tile model shares: input standardisation stored in the model, and the output dict.

Inputs every model accepts (all but the first two optional; a model ignores what it does not use):
    features [B, N, D], mask [B, N]            the patient's tiles (True = real tile)
    coords [B, N, 2]                           tile centres in micrometres (slides of a patient far apart)
    genomics [B, G], genomics_mask [B]         preprocessed genes; False = the patient has none
    clinical [B, C]                            preprocessed clinical covariates
    scale_features / scale_masks / scale_coords  lists, one entry per extra tile set (other magnifications)
"""

from __future__ import annotations

import torch
from torch import nn


class TileModel(nn.Module):
    """Base of the registered models. Tile features are standardised with the training fold's mean
    and standard deviation, kept as buffers so a saved model carries them; so are the features of
    each extra tile set (`scale_dims`)."""

    def __init__(self, in_dim: int, n_outputs: int, scale_dims: list[int] | None = None):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.scale_dims = list(scale_dims or [])
        for i, d in enumerate(self.scale_dims):
            self.register_buffer(f"scale_mean{i}", torch.zeros(d))
            self.register_buffer(f"scale_std{i}", torch.ones(d))
        self.n_outputs = n_outputs

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor, scale: int | None = None) -> None:
        """Standardisation of the main tile set's features, or of extra tile set `scale`."""
        m, s = (self.feat_mean, self.feat_std) if scale is None else \
            (getattr(self, f"scale_mean{scale}"), getattr(self, f"scale_std{scale}"))
        m.copy_(mean)
        s.copy_(std.clamp_min(1e-6))

    def normalise(self, features: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        if scale is None:
            return (features - self.feat_mean) / self.feat_std
        return (features - getattr(self, f"scale_mean{scale}")) / getattr(self, f"scale_std{scale}")

    def outputs(self, out: torch.Tensor, **extra) -> dict:
        """head output [B, n_outputs] -> {'risk': [B]} for one output, else {'logits': [B, C]}, plus extras."""
        out = out.float()
        return {**extra, **({"risk": out.squeeze(-1)} if self.n_outputs == 1 else {"logits": out})}


def clinical_or_mean(clinical: torch.Tensor | None, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Standardised clinical covariates [B, C]; when none are given, zeros: the training-fold mean."""
    return clinical if clinical is not None else like.new_zeros(like.shape[0], dim)


def check_option(name: str, value, allowed) -> None:
    """A model option outside `allowed` is a user error: name the option, the value and the choices."""
    if value not in allowed:
        raise ValueError(f"model option {name}={value!r} is not one of {', '.join(map(repr, allowed))}")
