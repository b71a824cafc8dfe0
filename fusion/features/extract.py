"""Streaming feature extraction: read tiles once, feed one or more encoders.

By default a reader thread decodes the next batches while the encoders run on the current one: the
slide's stored JPEG tiles are decoded directly where the file allows (`fusion.wsi.backends`, libjpeg-turbo
releases the GIL), so one thread keeps up with the model and no worker process has to start. With
`num_workers > 0`, DataLoader worker processes read instead, each with its own slide handle (for
formats only openslide reads, whose per-read cost is higher). Batches reach the device through
`fusion.features.device` (pinned memory and non-blocking copies, bf16 autocast on CUDA) and float16
features are stored. Output is written atomically, so a killed run never leaves a file that looks
complete; a rerun skips slides whose features match the current tiles and encoder version.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fusion.features.device import autocast, host_buffer, pick_device, to_device
from fusion.features.encoders import Encoder
from fusion.storage import atomic_path, hash_config
from fusion.wsi.slide import Slide, open_slide
from fusion.wsi.tiling import read_coords


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = 128
    num_workers: int = 0  # DataLoader worker processes; 0 reads in threads of this process
    read_threads: int = 1  # with num_workers == 0: threads decoding the next batches while the model runs
    device: str = "auto"  # "auto": CUDA when present, else CPU
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16" or "fp32" to force
    store_dtype: str = "float16"
    min_sharpness: float | None = None  # drop out-of-focus tiles below this Laplacian variance (None: keep all)
    stain_normalize: bool = False  # Macenko, estimated once per slide (fusion/features/stain.py)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got '{self.precision}'")
        if self.batch_size < 1 or self.num_workers < 0 or self.read_threads < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers, read_threads >= 0; got {self.batch_size}, "
                             f"{self.num_workers}, {self.read_threads}")


__all__ = ["ExtractConfig", "TileDataset", "extract_slide", "pick_device", "read_feature_info", "read_features",
           "write_features"]


class TileDataset(Dataset):
    """uint8 [3, S, S] tiles of one slide: the tiling's patch, resized to S = `out_size` pixels.

    Resizing happens here, in the workers, with OpenCV on bytes: cheaper than on float tensors.
    """

    def __init__(self, slide_path: str | Path, coords: np.ndarray, attrs: dict, out_size: int,
                 mpp: float | None = None, backend: str = "auto"):
        self.slide_path = str(slide_path)
        self.backend = backend
        self.coords = coords
        self.level = int(attrs["patch_level"])
        self.size0 = int(attrs["patch_size_level0"])
        self.out_size = int(out_size)
        self.mpp = mpp
        self._slide: Slide | None = None
        self._pid = -1

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # one handle per worker process
            self._slide = open_slide(self.slide_path, mpp=self.mpp or 1.0, backend=self.backend)
            self._pid = os.getpid()
        return self._slide

    def __len__(self) -> int:
        return len(self.coords)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def tile(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 [S, S, 3] of tile `i`, written into `out` when given."""
        slide = self._handle()
        read = max(1, int(round(self.size0 / slide.level_downsamples[self.level])))
        x, y = (int(v) for v in self.coords[i])
        rgb = slide.read_rgb((x, y), self.level, (read, read))
        if read != self.out_size:
            interp = cv2.INTER_AREA if read > self.out_size else cv2.INTER_LINEAR
            return cv2.resize(rgb, (self.out_size, self.out_size), dst=out, interpolation=interp)
        if out is None:
            return rgb
        out[:] = rgb
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tile(i)).permute(2, 0, 1)

    def batch(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """uint8 [B, 3, S, S] of tiles start..stop-1 (contiguous; pinned when bound for CUDA)."""
        s = self.out_size
        hwc = np.empty((stop - start, s, s, 3), np.uint8)
        for k, i in enumerate(range(start, stop)):
            self.tile(i, hwc[k])
        out = host_buffer((stop - start, 3, s, s), torch.uint8, device)
        return out.copy_(torch.from_numpy(hwc).permute(0, 3, 1, 2))


def tile_batches(dataset: TileDataset, config: ExtractConfig, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, S, S] batches in tile order, on the host, read ahead of the consumer.

    Threads (the default) share one slide handle: the stored-tile decoder and openslide are both
    thread-safe and release the GIL while decoding. Worker processes (`num_workers`) each open their own
    (forkserver: a fresh process, not a fork of one that runs Prefect's threads, which can deadlock).
    """
    n, size = len(dataset), config.batch_size
    if config.num_workers > 0:
        yield from DataLoader(dataset, batch_size=size, num_workers=config.num_workers, shuffle=False,
                              pin_memory=device.type == "cuda", multiprocessing_context="forkserver")
        return
    starts = range(0, n, size)
    dataset._handle()  # opened here, once, not by two reader threads racing
    if config.read_threads <= 0:
        for start in starts:
            yield dataset.batch(start, min(n, start + size), device)
        return
    with ThreadPoolExecutor(config.read_threads, thread_name_prefix="fusion-read") as pool:
        pending: deque = deque()
        for start in starts:
            pending.append(pool.submit(dataset.batch, start, min(n, start + size), device))
            if len(pending) > config.read_threads:  # keep one batch per thread in flight, no more
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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
        start = 0
        try:
            for batch in tile_batches(dataset, config, device):
                batch = to_device(batch, device)
                if normalizer is not None:
                    batch = normalizer(batch)
                with torch.inference_mode():
                    sharpness[start : start + len(batch)] = laplacian_variance(batch).cpu().numpy()
                    with autocast(device, config.precision):
                        for enc in todo:
                            x = _resize(batch, enc.input_size)
                            feats[enc.name][start : start + len(batch)] = enc.model(x).float().cpu().numpy()
                start += len(batch)
        finally:
            dataset.close()
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


def read_feature_info(path: str | Path) -> tuple[tuple[int, int], np.ndarray, dict]:
    """(shape of the features [N, D], coords [N, 2], attrs), without reading the features."""
    with h5py.File(path, "r") as f:
        return tuple(f["features"].shape), f["coords"][:], dict(f.attrs)
