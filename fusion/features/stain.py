"""Macenko stain normalisation (Macenko et al., ISBI 2009), estimated once per slide.

A slide has one staining, so its H&E stain vectors and stain maxima are estimated once, from a
mosaic of its tiles, and every batch is mapped to the reference staining with a few matrix
products on the device. (MONAI's `NormalizeHEStains` re-estimates per tile, ~40 ms a tile on a
CPU core, and on our test slides ordered the two stain vectors inconsistently.)

Estimation: optical density OD = -log((I + 1) / Io); pixels whose OD norm is below `beta` are
glass (a per-channel floor, as often used, would drop pale eosin, which absorbs little red); the
plane of the two largest principal directions of OD holds both stains; the stain vectors are the
directions at the `alpha` and 100 - `alpha` percentiles of the angle within that plane;
haematoxylin is the one absorbing more red.
"""

from __future__ import annotations

import numpy as np
import torch

IO = 240.0  # transmitted light intensity
TARGET_HE = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))  # reference stain vectors (columns H, E)
MAX_CREF = (1.9705, 1.0308)  # reference 99th-percentile stain concentrations


def estimate_stains(rgb: np.ndarray, alpha: float = 1.0, beta: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """(stain matrix [3, 2] with columns H, E; 99th-percentile concentrations [2]) of RGB uint8 pixels."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / IO)
    tissue = od[np.linalg.norm(od, axis=1) > beta]  # by total density: pale eosin has little red OD
    if len(tissue) < 100:
        raise ValueError(f"too little stained tissue to estimate stains ({len(tissue)} pixels)")
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]  # the two largest eigenvectors
    plane = plane * np.sign(plane.sum(0, keepdims=True))  # point both into positive OD
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2], 1) if v1[0] > v2[0] else np.stack([v2, v1], 1)  # H absorbs more red
    he = he / np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, tissue.T, rcond=None)[0]
    return he.astype(np.float32), np.percentile(conc, 99, axis=1).clip(1e-3).astype(np.float32)


class MacenkoNormalizer(torch.nn.Module):
    """uint8 [B, 3, H, W] -> uint8 [B, 3, H, W] in the reference staining."""

    def __init__(self, he: np.ndarray, max_c: np.ndarray):
        super().__init__()
        self.register_buffer("pinv", torch.linalg.pinv(torch.as_tensor(he, dtype=torch.float32)))  # [2, 3]
        self.register_buffer("target", torch.tensor(TARGET_HE, dtype=torch.float32))  # [3, 2]
        self.register_buffer("scale", torch.tensor(MAX_CREF, dtype=torch.float32) / torch.as_tensor(max_c).float())

    @classmethod
    def fit(cls, rgb: np.ndarray) -> MacenkoNormalizer:
        """From RGB uint8 pixels of the slide's tissue (any shape ending in 3)."""
        return cls(*estimate_stains(rgb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        od = -torch.log((x.float() + 1) / IO).reshape(b, 3, -1)
        conc = torch.einsum("sc,bcn->bsn", self.pinv, od) * self.scale[None, :, None]
        out = IO * torch.exp(-torch.einsum("cs,bsn->bcn", self.target, conc))
        return out.clamp(0, 255).round().to(torch.uint8).reshape(b, 3, h, w)
