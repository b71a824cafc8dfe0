"""The pipeline's stages as plain functions over a run folder (no Prefect here).

Per-slide stages never raise for a bad slide: they record the failure in the ledger and return
a summary with status 'failed', so one corrupt file does not stop a cohort. The Prefect flows in
`flows/` and the CLI both call these.
"""

from __future__ import annotations

import errno
import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from fusion.cohort import Cohort
from fusion.errors import FusionError, RunError
from fusion.features import ExtractConfig, create_encoder, extract_slide
from fusion.features.encoders import Encoder
from fusion.run import RunLayout
from fusion.storage import file_fingerprint, hash_config, write_json
from fusion.train.data import load_bags
from fusion.train.evaluate import evaluate_predictions
from fusion.train.loop import TrainConfig, cross_validate
from fusion.wsi import TilingConfig, tile_slide
from fusion.wsi.tiling import TILER_VERSION

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT, errno.EBUSY, errno.ECONNRESET}


def is_transient(error: BaseException) -> bool:
    """An I/O error worth retrying (network storage hiccups), as opposed to a bad or missing file."""
    if isinstance(error, FusionError | FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(error, TimeoutError | ConnectionError | InterruptedError | BlockingIOError):
        return True
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def _guarded(layout: RunLayout, step: str, item: str, fn, raise_transient: bool = False, **fields) -> dict:
    start = time.perf_counter()
    try:
        result = fn()
    except (FusionError, OSError, ValueError) as e:
        if raise_transient and is_transient(e):  # the orchestrator retries it, with backoff
            layout.ledger.record(step, item, "retrying", error=str(e), error_type=type(e).__name__, **fields)
            raise
        entry = {"slide_id": item, "status": "failed", "error": str(e), "error_type": type(e).__name__}
        layout.ledger.record(step, item, "failed", error=str(e), error_type=type(e).__name__,
                             traceback=traceback.format_exc(limit=3), **fields)
        return entry
    status = "skipped" if result.get("skipped") else "done"
    layout.ledger.record(step, item, status, inputs_hash=result.get("inputs_hash"),
                         outputs=result.get("outputs"), seconds=round(time.perf_counter() - start, 3),
                         n_tiles=result.get("n_tiles"), **fields)
    return {**result, "status": status}


def tile_one(layout: RunLayout, slide_id: str, path: str, config: TilingConfig,
             mpp: float | None = None, tile_set: str = "", raise_transient: bool = False) -> dict:
    """Tile one slide into RUN/tiles[/<tile_set>]; a failure is recorded, not raised (a transient
    I/O error is re-raised when `raise_transient`, for the caller to retry)."""
    return _guarded(layout, "tile", slide_id,
                    lambda: tile_slide(path, slide_id, layout.tiles_dir(tile_set), config, mpp=mpp),
                    raise_transient=raise_transient, tile_set=tile_set)


def extract_one(layout: RunLayout, slide_id: str, path: str, encoders: list[Encoder],
                config: ExtractConfig = ExtractConfig(), tile_set: str = "", raise_transient: bool = False) -> dict:
    """Features of one tiled slide for each encoder; needs RUN/tiles[/<tile_set>]/<slide_id>.h5."""
    tiles = layout.tiles_h5(slide_id, tile_set)

    def run() -> dict:
        if not tiles.exists():
            raise RunError(f"no tiles for slide {slide_id} ({tiles}); tiling failed or was not run")
        return extract_slide(path, tiles, slide_id, layout.root / "features", encoders, config, subdir=tile_set)

    return _guarded(layout, "extract", slide_id, run, raise_transient=raise_transient,
                    encoders=[e.name for e in encoders], tile_set=tile_set)


def build_encoders(names: list[str], layout: RunLayout | None = None) -> list[Encoder]:
    """Encoders by name; a name trained in this run (`fusion pretrain`) resolves to RUN/encoders/<name>."""
    out = []
    for n in names:
        if layout is not None and (layout.encoder_dir(n) / "config.json").exists():
            n = f"ssl@{layout.encoder_dir(n)}"
        out.append(create_encoder(n))
    return out


def pretrain_stage(layout: RunLayout, cohort: Cohort, config, name: str | None = None, on_epoch=None) -> Path:
    """Self-supervised pretraining on tiles of the run; the encoder lands in RUN/encoders/<name>."""
    from fusion.features.ssl import pretrain, sample_tiles

    slides = [(p, layout.tiles_h5(s)) for s, p in slide_rows(cohort) if layout.tiles_h5(s).exists()]
    if not slides:
        raise RunError(f"no tiles in {layout.tiles}; run `fusion tile` first")
    tiles = sample_tiles(slides, config.tiles, config.size, config.seed)
    out = pretrain(tiles, config, layout.encoder_dir(name or config.method), on_epoch=on_epoch)
    layout.ledger.record("pretrain", name or config.method, "done", outputs=[str(out)], n_tiles=len(tiles))
    return out


def train_stage(layout: RunLayout, cohort: Cohort, config: TrainConfig, on_epoch=None, force: bool = False) -> dict:
    """Cross-validate `config.model` on the run's features; writes RUN/models/<model>/.

    Skipped (the stored summary is returned, with `skipped: True`) when the model folder records
    the same training inputs hash: the features of every slide, the patient tables and the config.
    """
    from fusion.train.baselines import BASELINES, cross_validate_baseline
    from fusion.train.folds import ensure_fold_table
    from fusion.train.loop import MULTIMODAL

    out = layout.model_dir(config.model if config.task == "survival" else f"{config.model}-classification")
    folds = ensure_fold_table(layout.root, cohort, config.folds, config.seed)  # one table for every model
    inputs_hash = hash_config({"inputs": training_inputs_hash(layout, cohort, config), "folds": folds.fingerprint})
    if not force and _stamp_matches(out / TRAIN_STAMP, inputs_hash) and (out / "cv_metrics.json").exists():
        summary = {**json.loads((out / "cv_metrics.json").read_text()), "skipped": True}
        layout.ledger.record("train", out.name, "skipped", inputs_hash=inputs_hash, outputs=[str(out)])
        return summary

    bags, missing = load_bags(layout, cohort, config.encoder, config.tile_set,
                              keep_without_tiles=config.model in MULTIMODAL or config.model in BASELINES,
                              extra_tile_sets=config.extra_tile_sets)
    if config.task == "survival":  # patients whose outcome is not known yet are scored, never trained on
        bags = bags.subset(np.flatnonzero(np.isfinite(bags.time)))
    if len(bags) < config.folds * 2:
        raise RunError(f"only {len(bags)} patients have features for encoder '{config.encoder}' in "
                       f"{layout.root}; run `fusion extract` first (or use fewer folds)")
    if config.model in BASELINES:
        if config.task != "survival":
            raise RunError(f"baseline '{config.model}' is a survival model; use --task survival")
        summary = cross_validate_baseline(bags, config.model, config.folds, config.seed, config.max_genes, out,
                                          table=folds)
    else:
        summary = cross_validate(bags, config, out, on_epoch=on_epoch, folds=folds)
    summary["patients_without_features"] = missing
    write_json(out / TRAIN_STAMP, {"inputs_hash": inputs_hash, "config": asdict(config)})  # last: a kill retrains
    layout.ledger.record("train", out.name, "done", outputs=[str(out)], config=asdict(config), inputs_hash=inputs_hash,
                         score=summary.get("c_index_mean", summary.get("auc_mean")), excluded=missing)
    return summary


def evaluate_stage(layout: RunLayout, cohort: Cohort, model: str) -> dict:
    model_dir = layout.model_dir(model)
    if not (model_dir / "predictions.parquet").exists():
        raise RunError(f"no predictions in {model_dir}; run `fusion train` first")
    result = evaluate_predictions(model_dir, cohort)
    layout.ledger.record("evaluate", model, "done", outputs=[str(model_dir / "evaluation.json")],
                         score=result.get("c_index_mean", result.get("auc_mean")))
    return result


def slide_rows(cohort: Cohort) -> list[tuple[str, str]]:
    return [(str(s), str(p)) for s, p in zip(cohort.slides.slide_id, cohort.slides.path, strict=True)]


# --- Stage-level planning: which items of a stage are stale, decided before any task starts ----------------
# A rerun of a 10,000-slide cohort after one slide landed should start one tiling task, not 10,000
# that each find nothing to do. The checks below recompute the hashes the library stores in its
# outputs. Should a formula here drift from the library's, the hashes stop matching and the item is
# handed to the library, which decides for itself: drift costs work, never correctness.

TRAIN_STAMP = "inputs.json"  # RUN/models/<model>/inputs.json: the training inputs hash of the stored folds


def tiling_is_current(layout: RunLayout, slide_id: str, path: str, config: TilingConfig,
                      mpp: float | None = None, tile_set: str = "") -> int | None:
    """The tile count of the slide's `.h5` when it was made from this slide and these parameters, else None."""
    h5_path = layout.tiles_h5(slide_id, tile_set)
    if not (h5_path.exists() and h5_path.with_suffix(".tissue.png").exists() and Path(path).is_file()):
        return None
    expected = hash_config({"slide": file_fingerprint(path), "config": asdict(config), "mpp": mpp,
                            "version": TILER_VERSION})
    attrs = _h5_attrs(h5_path, with_rows="coords")
    return attrs["rows"] if attrs.get("inputs_hash") == expected else None


def extraction_is_current(layout: RunLayout, slide_id: str, encoders: list[Encoder],
                          config: ExtractConfig = ExtractConfig(), tile_set: str = "") -> int | None:
    """The tile count when every encoder's features match the slide's current tiles, else None."""
    tiles = _h5_attrs(layout.tiles_h5(slide_id, tile_set), with_rows="coords")
    if "inputs_hash" not in tiles:
        return None
    stain = "+macenko" if config.stain_normalize else ""
    for enc in encoders:
        attrs = _h5_attrs(layout.features_h5(enc.name, slide_id, tile_set))
        if attrs.get("tiles_hash") != tiles["inputs_hash"] or attrs.get("encoder_version") != enc.version + stain:
            return None
    return tiles["rows"]


def tile_count(layout: RunLayout, slide_id: str, tile_set: str = "") -> int:
    """Tiles in the slide's `.h5` (0 when it has none)."""
    return _h5_attrs(layout.tiles_h5(slide_id, tile_set), with_rows="coords").get("rows", 0)


def training_inputs_hash(layout: RunLayout, cohort: Cohort, config: TrainConfig) -> str:
    """Hash of what a model's cross-validation depends on: each slide's features (by the hashes
    stored in their files), the patients and genomics tables, and the training config."""
    features = {}
    for sid in cohort.slides.slide_id:
        for enc in config.encoder.split("+"):
            for tile_set in (config.tile_set, *config.extra_tile_sets):
                attrs = _h5_attrs(layout.features_h5(enc, str(sid), tile_set))
                key = f"{sid}/{enc}" if tile_set == config.tile_set else f"{sid}/{enc}/{tile_set}"
                features[key] = [str(attrs.get(k)) for k in ("tiles_hash", "encoder_version", "min_sharpness")]
    return hash_config({"features": features, "patients": table_hash(cohort.patients),
                        "genomics": None if cohort.genomics is None else table_hash(cohort.genomics),
                        "config": asdict(config)})


def table_hash(df: pd.DataFrame) -> str:
    """Content hash of a table (values, index and column names)."""
    rows = pd.util.hash_pandas_object(df, index=True).to_numpy()
    return hash_config({"columns": [str(c) for c in df.columns], "rows": hash_config(rows.tolist())})


def stage_is_current(layout: RunLayout, stage: str, inputs_hash: str) -> bool:
    """Whether RUN/stages/<stage>.json records `inputs_hash` (the stage finished with these inputs)."""
    return _stamp_matches(layout.root / "stages" / f"{stage}.json", inputs_hash)


def mark_stage(layout: RunLayout, stage: str, inputs_hash: str, **fields) -> None:
    write_json(layout.root / "stages" / f"{stage}.json", {"inputs_hash": inputs_hash, **fields})


def _stamp_matches(path: Path, inputs_hash: str) -> bool:
    try:
        return json.loads(path.read_text()).get("inputs_hash") == inputs_hash
    except (OSError, ValueError):
        return False


def _h5_attrs(path: Path, with_rows: str | None = None) -> dict:
    """A file's attributes (and `rows`: the length of dataset `with_rows`); {} when missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if with_rows:
                attrs["rows"] = int(f[with_rows].shape[0])
            return attrs
    except (OSError, KeyError):
        return {}


__all__ = ["tile_one", "extract_one", "build_encoders", "train_stage", "evaluate_stage", "slide_rows",
           "tiling_is_current", "extraction_is_current", "training_inputs_hash", "stage_is_current", "mark_stage"]
