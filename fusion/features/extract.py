"""Streaming feature extraction: read tiles once with openslide, feed one or more encoders.

DataLoader workers each open their own openslide handle (handles are not fork-safe to share)
and ship uint8 tiles; the main process moves batches to the device (pinned memory and
non-blocking copies on CUDA, bf16 autocast there) and stores float16 features. Output is written
atomically, so a killed run never leaves a file that looks complete; a rerun skips slides whose
features match the current tiles and encoder version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fusion.features.encoders import Encoder
from fusion.storage import atomic_path, hash_config
from fusion.wsi.slide import Slide, open_slide
from fusion.wsi.tiling import read_coords


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = 128
    num_workers: int = 0  # DataLoader worker processes; 0 reads in the calling thread
    device: str = "auto"  # "auto": CUDA when present, else CPU
    store_dtype: str = "float16"
    min_sharpness: float | None = None  # drop out-of-focus tiles below this Laplacian variance (None: keep all)
    stain_normalize: bool = False  # Macenko, estimated once per slide (fusion/features/stain.py)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TileDataset(Dataset):
    """uint8 [3, S, S] tiles of one slide: the tiling's patch, resized to S = `out_size` pixels.

    Resizing happens here, in the workers, with OpenCV on bytes: cheaper than on float tensors.
    """

    def __init__(self, slide_path: str | Path, coords: np.ndarray, attrs: dict, out_size: int,
                 mpp: float | None = None):
        self.slide_path = str(slide_path)
        self.coords = coords
        self.level = int(attrs["patch_level"])
        self.size0 = int(attrs["patch_size_level0"])
        self.out_size = int(out_size)
        self.mpp = mpp
        self._slide: Slide | None = None
        self._pid = -1

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # one handle per worker process
            self._slide = open_slide(self.slide_path, mpp=self.mpp or 1.0)
            self._pid = os.getpid()
        return self._slide

    def __len__(self) -> int:
        return len(self.coords)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getitem__(self, i: int) -> torch.Tensor:
        slide = self._handle()
        read = max(1, int(round(self.size0 / slide.level_downsamples[self.level])))
        x, y = (int(v) for v in self.coords[i])
        rgb = slide.read_rgb((x, y), self.level, (read, read))
        if read != self.out_size:
            interp = cv2.INTER_AREA if read > self.out_size else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (self.out_size, self.out_size), interpolation=interp)
        return torch.from_numpy(rgb).permute(2, 0, 1)


def extract_slide(
    slide_path: str | Path,
    tiles_h5: str | Path,
    slide_id: str,
    out_root: str | Path,
    encoders: list[Encoder],
    config: ExtractConfig = ExtractConfig(),
    *,
    subdir: str = "",
    force: bool = False,
) -> dict:
    """Features of every tile of one slide for each encoder, into `out_root/<encoder>[/<subdir>]/<id>.h5`.

    Encoders whose output already matches the tiles (by the tiles' inputs hash) and the encoder
    version are skipped; the pixels are read once for all remaining encoders.
    """
    coords, attrs = read_coords(tiles_h5)
    tiles_hash = str(attrs.get("inputs_hash", hash_config(coords.tolist())))
    todo, outputs = [], {}
    stain = "+macenko" if config.stain_normalize else ""
    for enc in encoders:
        out = Path(out_root) / enc.name / subdir / f"{slide_id}.h5"
        outputs[enc.name] = str(out)
        if force or not _is_current(out, tiles_hash, enc.version + stain):
            todo.append(enc)
    summary = {"slide_id": slide_id, "n_tiles": int(len(coords)), "outputs": outputs,
               "inputs_hash": hash_config({"tiles": tiles_hash, "encoders": [e.version for e in encoders]}),
               "skipped": not todo}
    if not todo:
        return summary

    device = pick_device(config.device)
    feats = {enc.name: np.zeros((len(coords), enc.dim), config.store_dtype) for enc in todo}
    sharpness = np.zeros(len(coords), np.float32)
    if len(coords):
        for enc in todo:
            enc.to(device)
        out_size = max(enc.input_size for enc in todo)
        dataset = TileDataset(slide_path, coords, attrs, out_size, mpp=float(attrs["level0_mpp"]))
        normalizer = _fit_normalizer(dataset).to(device) if config.stain_normalize else None
        # forkserver: workers start from a clean process, not a fork of one that runs threads
        # (Prefect's task runner and API client), which can deadlock or die in the child.
        loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                            pin_memory=device.type == "cuda", shuffle=False,
                            multiprocessing_context="forkserver" if config.num_workers > 0 else None)
        start = 0
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            if normalizer is not None:
                batch = normalizer(batch)
            sharpness[start : start + len(batch)] = laplacian_variance(batch).cpu().numpy()
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                         enabled=device.type == "cuda"):
                for enc in todo:
                    x = _resize(batch, enc.input_size)
                    feats[enc.name][start : start + len(batch)] = enc.model(x).float().cpu().numpy()
            start += len(batch)
    keep = np.ones(len(coords), bool) if config.min_sharpness is None else sharpness >= config.min_sharpness
    for enc in todo:
        write_features(Path(outputs[enc.name]), feats[enc.name][keep], coords[keep],
                       {**_plain(attrs), "encoder": enc.name, "encoder_version": enc.version + stain,
                        "dim": enc.dim, "tiles_hash": tiles_hash, "slide_id": slide_id,
                        "min_sharpness": -1.0 if config.min_sharpness is None else config.min_sharpness,
                        "tiles_out_of_focus": int((~keep).sum())},
                       sharpness=sharpness[keep])
    summary["tiles_out_of_focus"] = int((~keep).sum())
    return summary


def _fit_normalizer(dataset: TileDataset, n: int = 64):
    """Macenko stains of the slide, from up to `n` tiles spread over it."""
    from fusion.features.stain import MacenkoNormalizer

    idx = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int))
    return MacenkoNormalizer.fit(np.stack([dataset[i].permute(1, 2, 0).numpy() for i in idx]))


def laplacian_variance(batch: torch.Tensor) -> torch.Tensor:
    """Focus measure [B]: variance of the Laplacian of the grey tile (low = blurred or blank)."""
    grey = batch.float().mean(1, keepdim=True) / 255.0
    centre = grey[..., 1:-1, 1:-1]
    lap = grey[..., 1:-1, :-2] + grey[..., 1:-1, 2:] + grey[..., :-2, 1:-1] + grey[..., 2:, 1:-1] - 4 * centre
    return lap.flatten(1).var(1) * 1e4


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> uint8 [B, 3, size, size] (antialiased) when an encoder wants less."""
    if batch.shape[-1] == size:
        return batch
    x = torch.nn.functional.interpolate(batch.float(), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _is_current(path: Path, tiles_hash: str, version: str) -> bool:
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("tiles_hash") == tiles_hash and f.attrs.get("encoder_version") == version
    except OSError:
        return False


def _plain(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in {"inputs_hash", "name"}}


def write_features(path: Path, features: np.ndarray, coords: np.ndarray, attrs: dict, **extra: np.ndarray) -> None:
    """CLAM/TRIDENT layout: `features` [N, D] and `coords` [N, 2] datasets, metadata in attrs."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        for name, arr in extra.items():
            f.create_dataset(name, data=arr)
        for k, v in attrs.items():
            f.attrs[k] = v


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features [N, D] float32, coords [N, 2], attrs)."""
    with h5py.File(path, "r") as f:
        return f["features"][:].astype(np.float32), f["coords"][:], dict(f.attrs)
