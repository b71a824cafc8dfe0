"""Score patients with a trained model: every fold's checkpoint, combined (a k-fold ensemble).

Fold models' risks are on different scales, so a survival score is never a mean of raw risks: each
fold's risk is placed among the risks that fold gave its own training patients (its percentile),
and the ensemble score `risk_percentile` is the mean of those percentiles (0-100, higher = worse);
`risk_group` cuts it at 50. Each fold's raw risk is kept in `risk_fold<k>` for reference.

The run may be another run than the training one (new patients): its features must come from
the same encoder (checked by name) and its genomics/clinical data are transformed with each fold's
stored preprocessing, never refitted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fusion.cohort import Cohort
from fusion.errors import RunError
from fusion.features.extract import pick_device
from fusion.run import RunLayout
from fusion.storage import atomic_path
from fusion.survival.crossval import percentile_of
from fusion.train.checkpoint import fold_dirs, load_checkpoint
from fusion.train.data import Preprocessor, load_bags
from fusion.train.loop import MULTIMODAL, hazard_risk, predict_risk


def predict_patients(model_dir: str | Path, layout: RunLayout, cohort: Cohort, out: str | Path | None = None,
                     device: str = "auto", on_fold: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Ensemble predictions (mean over folds) for every patient of `cohort` that can be scored.
    `on_fold(done, total)` is called as each fold's model has scored them (for a progress bar)."""
    model_dir = Path(model_dir)
    folds = fold_dirs(model_dir)
    dev = pick_device(device)
    bags, outputs, percentiles, config = None, [], [], {}
    for k, folder in enumerate(folds):
        model, config = load_checkpoint(folder)
        train = config["train_config"]
        if bags is None:  # every fold of a model was trained on the same features: read them once
            bags, _ = load_bags(layout, cohort, config["encoder"], train.get("tile_set", ""),
                                keep_without_tiles=train["model"] in MULTIMODAL,
                                extra_tile_sets=train.get("extra_tile_sets", ()))
            if not len(bags):
                raise RunError(f"no patient of {cohort.root} has '{config['encoder']}' features in {layout.root}; "
                               f"run `fusion extract {layout.root} --encoder {config['encoder']}` first")
        fold_bags = dataclasses.replace(bags, tab=Preprocessor.from_state(config["preprocessor"]).transform(bags))
        hazards = train.get("loss") == "nll" and train.get("task", "survival") == "survival"
        scores = predict_risk(model.to(dev), fold_bags, dev, hazards=hazards)
        outputs.append(hazard_risk(scores) if hazards else scores)
        if outputs[-1].ndim == 1:
            cut = _training_percentiles(folder)
            percentiles.append(percentile_of(outputs[-1], cut))
        if on_fold:
            on_fold(k + 1, len(folds))
    ids = bags.ids
    table = pd.DataFrame({"patient_id": ids})
    if outputs[0].ndim == 1:
        pct = np.stack(percentiles)
        table["risk_percentile"] = pct.mean(0)
        table["risk_percentile_sd_over_folds"] = pct.std(0)
        table["risk_group"] = np.where(table["risk_percentile"] >= 50, "high", "low")
        for k, out_k in enumerate(outputs):
            table[f"risk_fold{k}"] = out_k
    else:
        mean = np.mean(outputs, axis=0)
        classes = config.get("classes", [str(i) for i in range(mean.shape[1])])
        for c, name in enumerate(classes):
            table[f"prob_{name}"] = mean[:, c]
        table["predicted"] = [classes[i] for i in mean.argmax(1)]
    table["model"] = model_dir.name
    table["folds"] = len(folds)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            table.to_parquet(tmp, index=False)
    return table


def _training_percentiles(fold_dir: Path) -> list[float]:
    """The fold's percentiles of its training patients' risks (stored in metrics.json)."""
    import json

    metrics = json.loads((fold_dir / "metrics.json").read_text())
    cut = (metrics.get("train_risk_cutoffs") or {}).get("percentiles")
    if cut is None:
        raise RunError(f"{fold_dir} was trained before folds stored their training risks: its scores cannot be "
                       "put on a scale shared with the other folds; retrain the model")
    return cut
