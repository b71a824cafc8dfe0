"""What every tile model shares: input standardisation stored in the model, and the output dict."""

from __future__ import annotations

import torch
from torch import nn


class TileModel(nn.Module):
    """Base of the registered models. Tile features are standardised with the training fold's mean
    and standard deviation, kept as buffers so a saved model carries them."""

    def __init__(self, in_dim: int, n_outputs: int):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.n_outputs = n_outputs

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std.clamp_min(1e-6))

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feat_mean) / self.feat_std

    def outputs(self, out: torch.Tensor, **extra) -> dict:
        """head output [B, n_outputs] -> {'risk': [B]} for one output, else {'logits': [B, C]}, plus extras."""
        out = out.float()
        return {**extra, **({"risk": out.squeeze(-1)} if self.n_outputs == 1 else {"logits": out})}


def clinical_or_mean(clinical: torch.Tensor | None, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Standardised clinical covariates [B, C]; when none are given, zeros: the training-fold mean."""
    return clinical if clinical is not None else like.new_zeros(like.shape[0], dim)
