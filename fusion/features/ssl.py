"""Self-supervised pretraining of a tile encoder on the cohort's own tiles (DINO, MoCo v3), as
BioFusionNet did, so a cohort without foundation-model weights still gets learned features.

    DINO (Caron et al. 2021): a student matches a momentum teacher's centred, sharpened
        distribution over K prototypes, across augmented views of the same tile.
    MoCo v3 (Chen et al. 2021): a query encoder with a predictor matches the momentum encoder's
        key of the other view among the batch (InfoNCE, temperature 0.2), symmetrised.

Augmentations suited to H&E run batched on the device: random resized crops (one `roi_align`
call for the batch), flips and 90-degree rotations (tissue has no orientation), HED stain jitter
(scale and shift in haematoxylin/eosin optical density, as stain varies between labs), brightness
and contrast. The backbone is a timm ViT (small by default, so 2 CPU cores finish in minutes;
on a GPU raise `--size`, `--tiles`, `--batch-size` and `--epochs`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.features.encoders import Encoder
from fusion.features.handcrafted import RGB_FROM_HED
from fusion.storage import atomic_path, write_json


@dataclass(frozen=True)
class PretrainConfig:
    method: str = "dino"  # dino | mocov3
    size: int = 64  # tile side in pixels fed to the network
    patch: int = 8  # ViT patch size
    dim: int = 192
    depth: int = 4
    heads: int = 3
    tiles: int = 4096  # tiles sampled from the run
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.04
    momentum: float = 0.99  # teacher / key encoder EMA, raised towards 1 on a cosine
    out_dim: int = 1024  # DINO prototypes / MoCo projection width
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in ("dino", "mocov3"):
            raise ValueError(f"method must be 'dino' or 'mocov3', got '{self.method}'")
        if self.size % self.patch:
            raise ValueError(f"size ({self.size}) must be a multiple of patch ({self.patch})")


def backbone(config: PretrainConfig) -> nn.Module:
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=config.size,
                             patch_size=config.patch, embed_dim=config.dim, depth=config.depth,
                             num_heads=config.heads, dynamic_img_size=True)


class SSLEncoder(nn.Module):
    """uint8 [B, 3, H, W] -> [B, D] with the pretrained backbone (scales pixels to [-1, 1])."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net = net
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.net(x / 127.5 - 1.0)


# ------------------------------------------------------------------ augmentations


def augment(x: torch.Tensor, size: int, scale: tuple[float, float] = (0.35, 1.0)) -> torch.Tensor:
    """A random view of each tile: float [B, 3, S, S] uint8-range -> float [B, 3, size, size] in [-1, 1]."""
    from torchvision.ops import roi_align

    b, _, s, _ = x.shape
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(*scale)
    ratio = torch.exp(torch.empty(b, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3)))
    w = (s * torch.sqrt(area * ratio)).clamp(8, s)
    h = (s * torch.sqrt(area / ratio)).clamp(8, s)
    x0 = torch.rand(b, device=dev) * (s - w)
    y0 = torch.rand(b, device=dev) * (s - h)
    boxes = torch.stack([torch.arange(b, device=dev, dtype=torch.float32), x0, y0, x0 + w, y0 + h], 1)
    v = roi_align(x, boxes, output_size=(size, size), aligned=True)
    flip = torch.rand(b, device=dev) < 0.5
    v = torch.where(flip[:, None, None, None], v.flip(-1), v)
    k = torch.randint(0, 4, (b,), device=dev)
    for r in (1, 2, 3):
        sel = k == r
        if sel.any():
            v[sel] = torch.rot90(v[sel], r, dims=(2, 3))
    v = hed_jitter(v)
    bright = torch.empty(b, 1, 1, 1, device=dev).uniform_(-20, 20)
    contrast = torch.empty(b, 1, 1, 1, device=dev).uniform_(0.8, 1.2)
    mean = v.mean((1, 2, 3), keepdim=True)
    v = ((v - mean) * contrast + mean + bright).clamp(0, 255)
    return v / 127.5 - 1.0


def hed_jitter(x: torch.Tensor, sigma: float = 0.05, bias: float = 0.05) -> torch.Tensor:
    """Perturb stain amounts: OD -> HED, each stain scaled by 1+N(0, sigma) and shifted, back to RGB."""
    rgb_from_hed = RGB_FROM_HED.to(x.device)
    od = -torch.log((x / 255.0).clamp_min(1 / 255))
    hed = torch.einsum("bchw,cd->bdhw", od, torch.linalg.inv(rgb_from_hed))
    b = x.shape[0]
    alpha = 1 + sigma * torch.randn(b, 3, 1, 1, device=x.device)
    beta = bias * (torch.rand(b, 3, 1, 1, device=x.device) * 2 - 1)
    od = torch.einsum("bdhw,dc->bchw", hed * alpha + beta, rgb_from_hed).clamp_min(0)
    return torch.exp(-od) * 255.0


# ------------------------------------------------------------------ heads and losses


class DINOHead(nn.Module):
    def __init__(self, dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def _mlp(dim: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out),
                         nn.BatchNorm1d(out, affine=False))


class DINO(nn.Module):
    def __init__(self, net: nn.Module, dim: int, out_dim: int):
        super().__init__()
        self.student = nn.Sequential(net, DINOHead(dim, out_dim))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def loss(self, v1: torch.Tensor, v2: torch.Tensor, t_s: float = 0.1, t_t: float = 0.04) -> torch.Tensor:
        s = [self.student(v) / t_s for v in (v1, v2)]
        with torch.no_grad():
            t_raw = [self.teacher(v) for v in (v1, v2)]
            t = [F.softmax((r - self.center) / t_t, dim=-1) for r in t_raw]
            self.center.mul_(0.9).add_(0.1 * torch.cat(t_raw).mean(0, keepdim=True))
        return 0.5 * sum(-(t[i] * F.log_softmax(s[1 - i], dim=-1)).sum(-1).mean() for i in (0, 1))

    def online(self) -> nn.Module:
        return self.student

    def target(self) -> nn.Module:
        return self.teacher

    def encoder(self) -> nn.Module:
        return self.teacher[0]  # DINO's teacher backbone gives the better features


class MoCoV3(nn.Module):
    def __init__(self, net: nn.Module, dim: int, out_dim: int, tau: float = 0.2):
        super().__init__()
        self.base = nn.Sequential(net, _mlp(dim, 512, out_dim))
        self.predictor = _mlp(out_dim, 512, out_dim)
        self.momentum = copy.deepcopy(self.base).requires_grad_(False)
        self.tau = tau

    def _ctr(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.T / self.tau
        return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * 2 * self.tau

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        q1, q2 = self.predictor(self.base(v1)), self.predictor(self.base(v2))
        with torch.no_grad():
            k1, k2 = self.momentum(v1), self.momentum(v2)
        return self._ctr(q1, k2) + self._ctr(q2, k1)

    def online(self) -> nn.Module:
        return self.base

    def target(self) -> nn.Module:
        return self.momentum

    def encoder(self) -> nn.Module:
        return self.base[0]


# ------------------------------------------------------------------ training


def pretrain(tiles: torch.Tensor, config: PretrainConfig, out_dir: str | Path,
             on_epoch: Callable[[int, float], None] | None = None) -> Path:
    """Train on uint8 tiles [N, 3, S, S]; write `out_dir/model.safetensors` + `config.json`."""
    from safetensors.torch import save_file

    from fusion.features.device import autocast, pick_device

    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    net = backbone(config)
    model = (DINO if config.method == "dino" else MoCoV3)(net, config.dim, config.out_dim).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    data = tiles.to(device)
    steps_per_epoch = max(1, len(data) // config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, total // 10)
    history, step, start = [], 0, time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), device=device)
        losses = []
        model.train()
        for i in range(steps_per_epoch):
            batch = data[order[i * config.batch_size : (i + 1) * config.batch_size]].float()
            lr = config.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(device):
                loss = model.loss(augment(batch, config.size), augment(batch, config.size))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 3.0)
            opt.step()
            m = 1 - (1 - config.momentum) * 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.no_grad():
                for po, pt in zip(model.online().parameters(), model.target().parameters(), strict=True):
                    pt.mul_(m).add_(po.detach(), alpha=1 - m)
            losses.append(float(loss.detach()))
            step += 1
        history.append(float(np.mean(losses)))
        if on_epoch:
            on_epoch(epoch, history[-1])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.encoder().state_dict().items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / "config.json", {**asdict(config), "loss_history": history, "n_tiles": len(tiles),
                                         "seconds": time.perf_counter() - start,
                                         "feature_dim": config.dim})
    return out_dir


def load_ssl_encoder(folder: str | Path) -> Encoder:
    """The encoder written by `pretrain`, ready for extraction (name `ssl-<method>`)."""
    import json

    from safetensors.torch import load_file

    from fusion.storage import file_fingerprint

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no pretrained encoder (config.json missing); run `fusion pretrain`")
    raw = json.loads((folder / "config.json").read_text())
    config = PretrainConfig(**{k: v for k, v in raw.items() if k in PretrainConfig.__dataclass_fields__})
    net = backbone(config)
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    model = SSLEncoder(net, config.size).eval()
    version = f"ssl-{config.method}-{file_fingerprint(folder / 'model.safetensors')}"
    return Encoder(f"ssl-{config.method}", model, input_size=config.size, dim=config.dim, version=version)


def sample_tiles(slides: list[tuple[str, Path]], n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n', 3, size, size]: tiles drawn evenly across slides (path, tiles .h5) at random."""
    from fusion.features.extract import TileDataset
    from fusion.wsi import read_coords

    rng = np.random.default_rng(seed)
    per_slide = max(1, math.ceil(n / max(1, len(slides))))
    out = []
    for path, tiles_h5 in slides:
        coords, attrs = read_coords(tiles_h5)
        if not len(coords):
            continue
        pick = coords[rng.choice(len(coords), min(per_slide, len(coords)), replace=False)]
        dataset = TileDataset(path, pick, attrs, size, mpp=float(attrs["level0_mpp"]))
        out += [dataset[i] for i in range(len(pick))]
        dataset.close()
    if not out:
        raise ValueError("no tiles to pretrain on: tile the cohort first (`fusion tile`)")
    return torch.stack(out)[torch.from_numpy(rng.permutation(len(out))[:n])].contiguous()
