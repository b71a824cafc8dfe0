"""What a fold's training patients looked like, to tell when a new patient lies outside it.

Fitted on the training patients of a fold and stored with its checkpoint (so scoring a new
patient needs no training data), three measures, each with a threshold at the 99th percentile of
the training patients' own values:

- clinical: the range (min, max) of every numeric covariate;
- genomics: the root-mean-square z-score of the selected genes (z from the training mean and sd);
- tiles: the Mahalanobis distance of the patient's mean tile feature vector in the space of the
  training patients' first principal components (at most 16).

`out_of_distribution` turns them into plain sentences for the report, each naming its measure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PCS = 16
QUANTILE = 99


def fit_reference(clinical: pd.DataFrame | None, clinical_types: dict[str, str], genomics_z: np.ndarray | None,
                  genomics_present: np.ndarray | None, features: list[np.ndarray]) -> dict:
    """The reference of one training fold (JSON-able). `genomics_z` [P, G] standardised with the
    fold's preprocessing; `features` each patient's tiles [N_i, D] (N_i may be 0)."""
    ref: dict = {"numeric_ranges": {}}
    if clinical is not None:
        for col, kind in clinical_types.items():
            if kind == "numeric":
                v = pd.to_numeric(clinical[col], errors="coerce").dropna()
                if len(v):
                    ref["numeric_ranges"][col] = [float(v.min()), float(v.max())]
    if genomics_z is not None and genomics_present is not None and genomics_present.any():
        rms = np.sqrt((genomics_z[genomics_present] ** 2).mean(1))
        ref["genomics_rms_z"] = float(np.percentile(rms, QUANTILE))
    means = np.stack([f.mean(0) for f in features if len(f)]) if any(len(f) for f in features) else None
    if means is not None and len(means) >= 5:
        centre = means.mean(0)
        _, sing, vt = np.linalg.svd(means - centre, full_matrices=False)
        k = int(min(PCS, (sing > 1e-8 * sing[0]).sum(), len(means) - 1)) if sing[0] > 0 else 0
        if k:
            scale = sing[:k] / np.sqrt(len(means) - 1)
            dist = np.sqrt(((((means - centre) @ vt[:k].T) / scale) ** 2).sum(1))
            ref["tiles"] = {"centre": centre.tolist(), "components": vt[:k].tolist(), "scale": scale.tolist(),
                            "threshold": float(np.percentile(dist, QUANTILE))}
    return ref


def tile_distance(ref: dict, features: np.ndarray) -> float | None:
    """Mahalanobis distance of the mean tile features in the reference's principal components."""
    tiles = ref.get("tiles")
    if not tiles or not len(features):
        return None
    centre, comps, scale = (np.asarray(tiles[k], float) for k in ("centre", "components", "scale"))
    if features.shape[1] != len(centre):
        return None
    return float(np.sqrt(((((features.mean(0) - centre) @ comps.T) / scale) ** 2).sum()))


def out_of_distribution(ref: dict, clinical_row: pd.Series | None, genomics_z: np.ndarray | None,
                        genomics_present: bool, features: np.ndarray) -> list[str]:
    """Plain-language warnings (empty when the patient lies within the training cohort)."""
    notes = []
    for col, (low, high) in ref.get("numeric_ranges", {}).items():
        value = pd.to_numeric(pd.Series([None if clinical_row is None else clinical_row.get(col)]),
                              errors="coerce").iloc[0]
        if pd.notna(value) and not low <= value <= high:
            notes.append(f"{col} = {value:g} lies outside the range of the training patients ({low:g} to {high:g}); "
                         "the model has not seen such a value.")
    if genomics_z is not None and genomics_present and "genomics_rms_z" in ref:
        rms = float(np.sqrt((np.asarray(genomics_z, float) ** 2).mean()))
        if rms > ref["genomics_rms_z"]:
            notes.append(f"The gene expression profile lies far from the training cohort: its root-mean-square "
                         f"z-score over {len(genomics_z)} genes is {rms:.2f}, above that of 99% of training "
                         f"patients ({ref['genomics_rms_z']:.2f}).")
    distance = tile_distance(ref, features)
    if distance is not None and distance > ref["tiles"]["threshold"]:
        notes.append(f"The slides look unlike the training cohort's: the Mahalanobis distance of the mean tile "
                     f"features is {distance:.1f}, above that of 99% of training patients "
                     f"({ref['tiles']['threshold']:.1f}; first {len(ref['tiles']['scale'])} principal components).")
    return notes


__all__ = ["fit_reference", "out_of_distribution", "tile_distance"]
