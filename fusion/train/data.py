"""Patient bags: all tiles of all slides of a patient, batched with padding and a mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fusion.cohort import Cohort
from fusion.features.extract import read_features
from fusion.run import RunLayout


@dataclass
class Bags:
    """Tile features per patient, with outcomes aligned to `ids`."""

    ids: list[str]
    features: list[np.ndarray]  # each [N_i, D] float32
    time: np.ndarray  # [P]
    event: np.ndarray  # [P] bool

    def subset(self, idx: np.ndarray) -> Bags:
        idx = np.asarray(idx)
        return Bags([self.ids[i] for i in idx], [self.features[i] for i in idx],
                     self.time[idx], self.event[idx])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1])


def load_bags(layout: RunLayout, cohort: Cohort, encoder: str, tile_set: str = "") -> tuple[Bags, list[str]]:
    """Bags of every patient with at least one featurised tile, and the ids left out (no tiles)."""
    ids, feats, missing = [], [], []
    for pid in cohort.patients["patient_id"]:
        parts = []
        for sid in cohort.slides_of(pid)["slide_id"]:
            path = layout.features_h5(encoder, sid, tile_set)
            if path.exists():
                f, _, _ = read_features(path)
                if len(f):
                    parts.append(f)
        if parts:
            ids.append(pid)
            feats.append(np.concatenate(parts, 0))
        else:
            missing.append(pid)
    pts = cohort.patients.loc[ids]
    time = pts[cohort.spec.outcome.time].to_numpy(float)
    event = pts[cohort.spec.outcome.event].to_numpy().astype(bool)
    return Bags(ids, feats, time, event), missing


def collate(bags: list[np.ndarray], max_tiles: int | None, rng: np.random.Generator | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bags to the longest: features [B, N, D] and mask [B, N] (True = real tile).

    With `max_tiles`, a bag longer than that is subsampled at random (training only; at
    inference every tile counts).
    """
    chosen = []
    for f in bags:
        if max_tiles is not None and len(f) > max_tiles:
            assert rng is not None
            f = f[np.sort(rng.choice(len(f), max_tiles, replace=False))]
        chosen.append(f)
    n = max(len(f) for f in chosen)
    d = chosen[0].shape[1]
    x = np.zeros((len(chosen), n, d), np.float32)
    mask = np.zeros((len(chosen), n), bool)
    for i, f in enumerate(chosen):
        x[i, : len(f)] = f
        mask[i, : len(f)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def feature_moments(bags: list[np.ndarray], max_rows: int = 200_000, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over (a sample of) the tiles of the given bags."""
    stacked = np.concatenate(bags, 0)
    if len(stacked) > max_rows:
        stacked = stacked[np.random.default_rng(seed).choice(len(stacked), max_rows, replace=False)]
    return stacked.mean(0), stacked.std(0)
