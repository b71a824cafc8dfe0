"""`morph`: a handcrafted H&E morphology encoder, thousands of tiles/s on a CPU, no weights.

Per tile it measures what a pathologist's eye uses to tell tissue types apart, all as batched
tensor ops (so it runs on the GPU too):
  * colour: RGB and optical-density means and spreads, saturation, glass and dark fractions;
  * stains: haematoxylin / eosin concentrations by colour deconvolution (Ruifrok & Johnston's
    H&E-DAB matrix, as in scikit-image's `rgb2hed`), their means, spreads and high quantile fractions;
  * texture: gradient energy of grey and haematoxylin, and the anisotropy of the gradients
    (fibrous stroma is oriented, tumour is not);
  * nuclei: difference-of-Gaussians blob responses of haematoxylin at four scales (small
    lymphocyte nuclei vs large tumour nuclei) and the density of local maxima (nuclei counts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fusion.features.encoders import Encoder, register_encoder

# Rows: stain vectors (H, E, DAB) in optical density; the inverse maps OD to concentrations.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_SIGMAS = (1.0, 2.0)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


class MorphologyFeatures(nn.Module):
    """uint8 [B, 3, H, W] -> float32 [B, 39] of colour, stain, texture and nuclei statistics.

    Works at `work_size` pixels a side (128 for a 256-px tile at 0.5 um/px: 1 um/px, where a
    lymphocyte nucleus is still ~6 px across)."""

    def __init__(self, work_size: int = 128):
        super().__init__()
        self.work_size = work_size
        self.register_buffer("hed_from_rgb", _HED_FROM_RGB.clone())
        for i, s in enumerate(_SIGMAS):
            self.register_buffer(f"g{i}", _gaussian_kernel(s))

    def _blur(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Separable Gaussian as shifted multiply-adds: on a CPU, far faster than a
        single-channel conv2d for these short kernels."""
        k = getattr(self, f"g{i}").tolist()
        r = len(k) // 2
        h, w = x.shape[-2:]
        p = F.pad(x, (r, r, 0, 0), mode="replicate")
        x = sum(k[j] * p[..., :, j : j + w] for j in range(len(k)))
        p = F.pad(x, (0, 0, r, r), mode="replicate")
        return sum(k[j] * p[..., j : j + h, :] for j in range(len(k)))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        size = x.shape[-1]
        if size != self.work_size:
            if size % self.work_size == 0:  # exact factor: plain average pooling is much faster
                x = F.avg_pool2d(x, size // self.work_size)
            else:
                x = F.interpolate(x, size=(self.work_size, self.work_size), mode="area")
        b = x.shape[0]
        flat = lambda t: t.reshape(b, -1)  # noqa: E731
        od = -torch.log(x.clamp_min(1 / 255))  # [B, 3, H, W]
        hed = torch.einsum("bchw,cd->bdhw", od, self.hed_from_rgb).clamp_min(0)
        h, e = hed[:, :1], hed[:, 1:2]
        grey = x.mean(1, keepdim=True)
        r, g, bl = x[:, 0], x[:, 1], x[:, 2]
        mx = torch.maximum(torch.maximum(r, g), bl)
        mn = torch.minimum(torch.minimum(r, g), bl)
        sat = (mx - mn) / mx.clamp_min(1e-3)

        feats = [*_mean_std(x), *_mean_std(od), *_mean_std(hed[:, :2]),
                 flat(sat).mean(1, keepdim=True), flat(grey > 0.85).float().mean(1, keepdim=True),
                 flat(grey < 0.45).float().mean(1, keepdim=True)]
        for t in (0.15, 0.3, 0.5):  # stain mass above levels: nuclear vs cytoplasmic haematoxylin
            feats.append(flat(h > t).float().mean(1, keepdim=True))
            feats.append(flat(e > t).float().mean(1, keepdim=True))

        for img in (grey, h):
            gx = img[..., 1:-1, 2:] - img[..., 1:-1, :-2]  # central differences
            gy = img[..., 2:, 1:-1] - img[..., :-2, 1:-1]
            gx2, gy2, gxy = flat(gx * gx).mean(1), flat(gy * gy).mean(1), flat(gx * gy).mean(1)
            energy = gx2 + gy2
            anisotropy = torch.sqrt((gx2 - gy2) ** 2 + 4 * gxy**2) / energy.clamp_min(1e-6)
            feats += [energy.sqrt()[:, None], anisotropy[:, None]]

        # Difference-of-Gaussians bands on a pyramid (sigma 1, 2 at full size, then halve the
        # image and blur again): structures of ~1, 2, 4 and 8 px; large-kernel blurs are avoided.
        b1, b2 = self._blur(h, 0), self._blur(h, 1)
        half = F.avg_pool2d(b2, 2)
        b4 = self._blur(half, 0)
        quarter = F.avg_pool2d(b4, 2)
        b8 = self._blur(quarter, 0)
        for fine, coarse in ((h, b1), (b1, b2), (half, b4), (quarter, b8)):
            dog = fine - coarse
            feats += [flat(dog.clamp_min(0)).mean(1, keepdim=True), _mean_std(dog)[1]]
        for img in (b1, b2):  # nuclei counts: local maxima of smoothed haematoxylin above a floor
            feats.append(_count_peaks(img, 0.25) / (img.shape[-1] ** 2 / 1e3))
        return torch.cat(feats, 1)


def _mean_std(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over pixels, [B, C] each (one pass each)."""
    mean = t.mean((2, 3))
    var = (t * t).mean((2, 3)) - mean * mean
    return mean, var.clamp_min(0).sqrt()


def _count_peaks(img: torch.Tensor, floor: float) -> torch.Tensor:
    """[B, 1] number of strict 3x3 local maxima above `floor` (8 shifted comparisons: far
    cheaper on a CPU than a stride-1 max-pool)."""
    c = img[..., 1:-1, 1:-1]
    peak = c > floor
    h, w = img.shape[-2:]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            peak &= c >= img[..., dy : dy + h - 2, dx : dx + w - 2]
    return peak.reshape(img.shape[0], -1).float().sum(1, keepdim=True)


@register_encoder("morph")
def build_morph(work_size: int = 128, **_: object) -> Encoder:
    """Handcrafted morphology features (39-D); the CPU default."""
    model = MorphologyFeatures(work_size)
    dim = model(torch.zeros(1, 3, work_size, work_size, dtype=torch.uint8)).shape[1]
    return Encoder("morph", model, input_size=work_size, dim=dim, version=f"morph-1-ws{work_size}")
