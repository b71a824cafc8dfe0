"""Deep encoders from local weight files: any timm architecture, and the pathology foundation
models whose layouts we know. Nothing is downloaded: the user passes the path of the weights.

    timm:<architecture>@<path>     e.g. timm:vit_small_patch16_224@/models/vits.safetensors
    uni@<path>                     UNI (ViT-L/16, MahmoodLab): pytorch_model.bin or .safetensors
    uni2@<path>                    UNI2-h (ViT-H/14, 8 register tokens, SwiGLU)
    virchow@<path>                 Virchow (ViT-H/14, SwiGLU; class token + mean of patch tokens)
    phikon@<path>                  Phikon (ViT-B/16, iBOT; weights converted to timm key names)
    hoptimus0@<path>               H-optimus-0 (ViT-g/14, 4 register tokens)

Weights may be safetensors or a PyTorch state dict (read with `torch.load(weights_only=True)`,
never unpickling code). Common wrappers (`module.`, `model.`, `backbone.`, `encoder.`) are
stripped; classifier heads are dropped; any other mismatch is an error naming the keys, so a
wrong file never silently yields random features. CONCH (an open_clip CoCa model) and
CTransPath (a Swin with a custom convolutional stem) are not timm architectures: export their
image towers to a timm-compatible layout first, or register a builder of your own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fusion.errors import FusionError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.", "teacher.", "student.")


@dataclass(frozen=True)
class Foundation:
    """How to build one foundation model with timm, and how it wants its input."""

    arch: str
    kwargs: dict = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    mpp: float = 0.5
    pool: str = "cls"  # "cls": the model's pooled output; "cls+mean": concat class token and mean patch token


FOUNDATIONS: dict[str, Foundation] = {
    "uni": Foundation("vit_large_patch16_224", {"init_values": 1e-5, "dynamic_img_size": True}),
    "uni2": Foundation("vit_giant_patch14_224", {
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536, "init_values": 1e-5,
        "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
        "dynamic_img_size": True, "mlp_layer": "swiglu_packed", "act_layer": "silu"}),
    "virchow": Foundation("vit_huge_patch14_224", {
        "img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
        "dynamic_img_size": True, "mlp_layer": "swiglu_packed", "act_layer": "silu"}, pool="cls+mean"),
    "phikon": Foundation("vit_base_patch16_224", {}),
    "hoptimus0": Foundation("vit_giant_patch14_reg4_dinov2", {
        "img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)),
}


class TimmEncoder(nn.Module):
    """uint8 [B, 3, H, W] -> features [B, D]: resize, normalise, run a timm trunk, pool."""

    def __init__(self, trunk: nn.Module, mean, std, input_size: int, pool: str = "cls"):
        super().__init__()
        self.trunk = trunk
        self.input_size = input_size
        self.pool = pool
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std
        if self.pool == "cls+mean":
            tokens = self.trunk.forward_features(x)  # [B, 1 + R + P, D]
            prefix = getattr(self.trunk, "num_prefix_tokens", 1)
            return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1)
        return self.trunk(x)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors or a PyTorch state dict (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FusionError(f"encoder weights not found: {path}; place the weights file there "
                          "(no weights are downloaded: see README, 'Encoders')")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "teacher"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    return {_strip(k): v for k, v in state.items()}


def _resolve_layers(kwargs: dict) -> dict:
    """Presets name layers by string (so they stay plain data); timm wants the classes."""
    from timm.layers import SwiGLUPacked

    layers = {"swiglu_packed": SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU}
    return {k: layers.get(v, v) if isinstance(v, str) and k.endswith("_layer") else v for k, v in kwargs.items()}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def build_timm(arch: str, weights: str | Path | None, *, kwargs: dict | None = None, mean=None, std=None,
               input_size: int | None = None, pool: str = "cls") -> tuple[TimmEncoder, int, int]:
    """(encoder module, feature dim, input size) for a timm architecture with local weights."""
    import timm

    kwargs = _resolve_layers(dict(kwargs or {}))
    kwargs.setdefault("num_classes", 0)
    try:
        trunk = timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise FusionError(f"timm has no architecture '{arch}': {e}") from None
    if weights is not None:
        state = {k: v for k, v in load_state_dict(weights).items() if not k.startswith(("head.", "fc.", "classifier."))}
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FusionError(f"weights {weights} do not fit timm '{arch}': missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    cfg = timm.data.resolve_data_config({}, model=trunk)
    size = input_size or cfg["input_size"][-1]
    encoder = TimmEncoder(trunk, mean or cfg["mean"], std or cfg["std"], size, pool).eval()
    with torch.no_grad():
        dim = encoder(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1]
    return encoder, dim, size
