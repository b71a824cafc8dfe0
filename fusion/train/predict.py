"""Score patients with a trained model: every fold's checkpoint, averaged (a k-fold ensemble).

The run may be another run than the training one (new patients): its features must come from
the same encoder (checked by name) and its genomics/clinical data are transformed with each fold's
stored preprocessing, never refitted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from fusion.cohort import Cohort
from fusion.errors import RunError
from fusion.features.extract import pick_device
from fusion.run import RunLayout
from fusion.storage import atomic_path
from fusion.train.checkpoint import load_checkpoint
from fusion.train.data import Preprocessor, load_bags
from fusion.train.loop import MULTIMODAL, hazard_risk, predict_risk


def predict_patients(model_dir: str | Path, layout: RunLayout, cohort: Cohort, out: str | Path | None = None,
                     device: str = "auto") -> pd.DataFrame:
    """Ensemble predictions (mean over folds) for every patient of `cohort` that can be scored."""
    model_dir = Path(model_dir)
    folds = sorted(model_dir.glob("fold-*/model.safetensors"))
    if not folds:
        raise RunError(f"no fold checkpoints (fold-*/model.safetensors) in {model_dir}")
    dev = pick_device(device)
    bags, outputs, config = None, [], {}
    for weights in folds:
        model, config = load_checkpoint(weights.parent)
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
    ids = bags.ids
    mean = np.mean(outputs, axis=0)
    table = pd.DataFrame({"patient_id": ids})
    if mean.ndim == 1:
        table["risk"] = mean
        table["risk_sd_over_folds"] = np.std(outputs, axis=0)
    else:
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
