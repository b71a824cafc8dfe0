"""Import tile features computed by CLAM or TRIDENT into a run.

Both write one `.h5` per slide with `features` [N, D] and `coords` [N, 2] (CLAM: `h5_files/`;
TRIDENT: `features_<encoder>/`). A file is matched to a slide by its stem; every file is checked
(datasets present, shapes agree, finite values) and rewritten in our layout, atomically, with the
source recorded. Slides without a file are listed, not guessed.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from fusion.cohort import Cohort
from fusion.errors import FusionError
from fusion.features.extract import write_features
from fusion.run import RunLayout
from fusion.storage import file_fingerprint


def import_features(layout: RunLayout, cohort: Cohort, source: str | Path, encoder: str) -> dict:
    """Copy `source/<slide_id>.h5` files into RUN/features/<encoder>/; returns what was done."""
    source = Path(source)
    if not source.is_dir():
        raise FusionError(f"feature folder not found: {source}")
    imported, missing, problems = [], [], []
    dims = set()
    for sid in cohort.slides.slide_id:
        path = source / f"{sid}.h5"
        if not path.exists():
            missing.append(sid)
            continue
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f or "coords" not in f:
                    raise ValueError(f"needs 'features' and 'coords' datasets, has {sorted(f.keys())}")
                feats = np.asarray(f["features"][:], np.float32)
                coords = np.asarray(f["coords"][:], np.int64)
                attrs = {**dict(f["coords"].attrs), **dict(f.attrs)}
            feats = feats.reshape(len(feats), -1) if feats.ndim != 2 else feats
            if coords.shape != (len(feats), 2):
                raise ValueError(f"coords shape {coords.shape} does not match {len(feats)} feature rows")
            if not np.isfinite(feats).all():
                raise ValueError("features hold NaN or infinite values")
        except (OSError, ValueError) as e:
            problems.append(f"{path.name}: {e}")
            continue
        dims.add(feats.shape[1])
        keep = {k: v for k, v in attrs.items() if isinstance(v, (int, float, str, np.number))}
        write_features(layout.features_h5(encoder, sid), feats.astype(np.float16), coords,
                       {**keep, "encoder": encoder, "encoder_version": f"imported-{file_fingerprint(path)}",
                        "dim": feats.shape[1], "imported_from": str(path), "slide_id": sid})
        imported.append(sid)
    if len(dims) > 1:
        problems.append(f"feature dimensions differ between files: {sorted(dims)}")
    if problems:
        raise FusionError(f"{len(problems)} feature file(s) in {source} cannot be imported:\n  - "
                          + "\n  - ".join(problems))
    layout.ledger.record("import-features", encoder, "done", source=str(source), imported=len(imported),
                         missing=missing)
    return {"imported": imported, "missing": missing, "dim": dims.pop() if dims else None}
