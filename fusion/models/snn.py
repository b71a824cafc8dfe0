"""`genomics_snn`: a genomics (+ clinical) only network, the single-modality baseline of MCAT and
BioFusionNet: a self-normalising MLP (Klambauer et al. 2017) on the selected genes, the clinical
covariates and a "genomics missing" indicator. A patient without genomics enters with the training
mean of every gene (zeros after standardisation) and the indicator set, so the clinical covariates
still count. Tiles are ignored."""

from __future__ import annotations

import torch
from torch import nn

from fusion.models.base import TileModel, clinical_or_mean
from fusion.models.coattn import snn
from fusion.models.registry import register_model


class GenomicsSNN(TileModel):
    def __init__(self, genomic_dim: int, clinical_dim: int = 0, hidden: int = 128, dropout: float = 0.25,
                 n_outputs: int = 1, in_dim: int = 1):
        super().__init__(in_dim, n_outputs)  # tile standardisation unused: tiles are ignored
        self.body = snn(genomic_dim + 1 + clinical_dim, hidden, dropout)
        self.head = nn.Linear(hidden, n_outputs)
        self.genomic_dim, self.clinical_dim = genomic_dim, clinical_dim

    def forward(self, features: torch.Tensor, mask: torch.Tensor, genomics: torch.Tensor | None = None,
                genomics_mask: torch.Tensor | None = None, clinical: torch.Tensor | None = None, **_) -> dict:
        b = features.shape[0]
        if genomics is None:
            genomics = features.new_zeros(b, self.genomic_dim)
            genomics_mask = torch.zeros(b, dtype=torch.bool, device=features.device)
        present = genomics_mask[:, None].to(genomics.dtype)
        parts = [genomics * present, 1 - present]
        if self.clinical_dim:
            parts.append(clinical_or_mean(clinical, features, self.clinical_dim))
        h = self.body(torch.cat(parts, 1))
        attention = mask.float() / mask.float().sum(1, keepdim=True).clamp_min(1)  # uniform: tiles unused
        return self.outputs(self.head(h), attention=attention)


@register_model("genomics_snn")
def build_genomics_snn(in_dim: int = 1, n_outputs: int = 1, hidden: int = 128, dropout: float = 0.25,
                       genomic_dim: int = 16, clinical_dim: int = 0, **_) -> GenomicsSNN:
    return GenomicsSNN(genomic_dim, clinical_dim, hidden, dropout, n_outputs, in_dim)
