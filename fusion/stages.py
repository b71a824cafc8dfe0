"""The pipeline's stages as plain functions over a run folder (no Prefect here).

Per-slide stages never raise for a bad slide: they record the failure in the ledger and return
a summary with status 'failed', so one corrupt file does not stop a cohort. The Prefect flows in
`flows/` and the CLI both call these.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pandas as pd

from fusion.cohort import Cohort
from fusion.errors import FusionError, RunError, storage_error
from fusion.run import RunLayout, clean_partials
from fusion.storage import file_fingerprint, hash_config, read_json, write_json
from fusion.wsi import TilingConfig, tile_slide
from fusion.wsi.qc import LEGACY_QC_SUFFIX, QC_SUFFIX
from fusion.wsi.tiling import TILER_VERSION

# Features and training need torch and scikit-survival (seconds to import): each function imports
# them when called, so tiling (`fusion tile`) starts without them (issue 17).
if TYPE_CHECKING:
    from fusion.features import ExtractConfig
    from fusion.features.encoders import Encoder
    from fusion.train.loop import TrainConfig

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT, errno.EBUSY, errno.ECONNRESET}
RETRY_DELAYS = (2.0, 4.0, 8.0)  # seconds before the 1st, 2nd and 3rd retry of a transient I/O error


def is_transient(error: BaseException) -> bool:
    """An I/O error worth retrying (network storage hiccups), as opposed to a bad or missing file."""
    if isinstance(error, FusionError | FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(error, TimeoutError | ConnectionError | InterruptedError | BlockingIOError):
        return True
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def _describe(e: BaseException) -> str:
    """One line: the library's own errors say what is wrong; anything else is named by its type."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, FusionError | OSError | ValueError) else f"{type(e).__name__}: {text}"


def _guarded(layout: RunLayout, step: str, item: str, fn: Callable[[], dict],
             invalidate: Callable[[], list[Path]] = list, retry_delays: tuple[float, ...] = (), **fields) -> dict:
    """Run one item's step; any failure of the item is recorded and returned, never raised.

    A transient I/O error is retried after each of `retry_delays`; a failure moves what was derived
    from the item (`invalidate()`) to RUN/stale/, so nothing stale is read later. Only a failure of
    the run's own storage (full disk, read-only, no permission) is raised, as a StorageError: it
    is no item's fault and would fail every item the same way.
    """
    start = time.perf_counter()
    for attempt in range(len(retry_delays) + 1):
        try:
            result = fn()
            break
        except Exception as e:  # noqa: BLE001 - one item's failure, whatever it is, must not stop the others
            env = storage_error(e, str(layout.root))
            if env is not None:
                raise env from None
            if is_transient(e) and attempt < len(retry_delays):
                layout.ledger.record(step, item, "retrying", error=_describe(e), error_type=type(e).__name__,
                                     attempt=attempt + 1, **fields)
                time.sleep(retry_delays[attempt])
                continue
            stale = quarantine(layout, invalidate())
            layout.ledger.record(step, item, "failed", error=_describe(e), error_type=type(e).__name__,
                                 traceback=traceback.format_exc(limit=3), stale=stale, **fields)
            return {"slide_id": item, "status": "failed", "error": _describe(e), "error_type": type(e).__name__}
    status = "skipped" if result.get("skipped") else "done"
    layout.ledger.record(step, item, status, inputs_hash=result.get("inputs_hash"),
                         outputs=result.get("outputs"), seconds=round(time.perf_counter() - start, 3),
                         n_tiles=result.get("n_tiles"), **({"phase_seconds": result["phase_seconds"]}
                                                           if result.get("phase_seconds") else {}), **fields)
    return {**result, "status": status}


def quarantine(layout: RunLayout, paths: list[Path]) -> list[str]:
    """Move outputs whose input is no longer valid to RUN/stale/<same path>; returns what moved."""
    moved = []
    for path in paths:
        if path.exists():
            target = layout.stale / path.relative_to(layout.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.append(str(path.relative_to(layout.root)))
    return moved


def slide_outputs(layout: RunLayout, slide_id: str, tile_set: str = "", encoders: list[str] | None = None
                  ) -> list[Path]:
    """What the run derived from one slide in a tile set: tiles and QC picture (unless `encoders` are
    named), and the features of `encoders` (default: every encoder of the run)."""
    tiles = layout.tiles_h5(slide_id, tile_set)
    paths = [] if encoders is not None else [tiles, tiles.with_suffix(QC_SUFFIX), tiles.with_suffix(LEGACY_QC_SUFFIX)]
    if encoders is None:
        features = layout.root / "features"
        encoders = sorted(p.name for p in features.iterdir() if p.is_dir()) if features.is_dir() else []
    return paths + [layout.features_h5(enc, slide_id, tile_set) for enc in encoders]


def fail_missing_slides(layout: RunLayout, cohort: Cohort, step: str, tile_set: str = "",
                        only: set[str] | None = None) -> list[dict]:
    """Each slide whose file is gone is that slide's failure: recorded, and its tiles and features
    moved to RUN/stale/ (they describe a file that no longer exists). Returns one status per slide."""
    out = []
    for sid, reason in cohort.missing_slides.items():
        if only is not None and sid not in only:
            continue
        stale = quarantine(layout, slide_outputs(layout, sid, tile_set))
        layout.ledger.record(step, sid, "failed", error=reason, error_type="FileNotFoundError", stale=stale,
                             tile_set=tile_set)
        out.append({"slide_id": sid, "status": "failed", "error": reason, "error_type": "FileNotFoundError"})
    return out


def _drop_damaged(layout: RunLayout, paths: list[Path], expected: Callable[[dict], bool] = lambda info: True) -> None:
    """Move outputs that cannot be read (a torn copy) or fail `expected` to RUN/stale/, so they are redone."""
    quarantine(layout, [p for p in paths if p.exists() and not expected(_h5_info(p))])


def tile_one(layout: RunLayout, slide_id: str, path: str, config: TilingConfig,
             mpp: float | None = None, tile_set: str = "", retry_delays: tuple[float, ...] = ()) -> dict:
    """Tile one slide into RUN/tiles[/<tile_set>]; a failure is recorded, not raised, and what the
    run derived from the slide before is moved to RUN/stale/."""
    h5 = layout.tiles_h5(slide_id, tile_set)

    def run() -> dict:
        _drop_damaged(layout, [h5], lambda info: "coords" in info["shapes"])
        return tile_slide(path, slide_id, layout.tiles_dir(tile_set), config, mpp=mpp)

    return _guarded(layout, "tile", slide_id, run, lambda: slide_outputs(layout, slide_id, tile_set),
                    retry_delays, tile_set=tile_set)


def extract_one(layout: RunLayout, slide_id: str, path: str, encoders: list[Encoder],
                config: ExtractConfig | None = None, tile_set: str = "", retry_delays: tuple[float, ...] = ()
                ) -> dict:
    """Features of one tiled slide for each encoder; needs RUN/tiles[/<tile_set>]/<slide_id>.h5.
    A features file that cannot be read or does not match its encoder and tiles is redone."""
    from fusion.features import ExtractConfig, extract_slide

    config = config or ExtractConfig()
    tiles = layout.tiles_h5(slide_id, tile_set)
    names = [e.name for e in encoders]

    def run() -> dict:
        if not tiles.exists():
            raise RunError(f"no tiles for slide {slide_id} ({tiles}); tiling failed or was not run")
        n_tiles = _h5_info(tiles)["shapes"].get("coords", (None,))[0]
        for enc in encoders:
            _drop_damaged(layout, [layout.features_h5(enc.name, slide_id, tile_set)],
                          lambda info, enc=enc: _features_match(info, n_tiles, enc.dim))
        return extract_slide(path, tiles, slide_id, layout.root / "features", encoders, config, subdir=tile_set)

    return _guarded(layout, "extract", slide_id, run, lambda: slide_outputs(layout, slide_id, tile_set, names),
                    retry_delays, encoders=names, tile_set=tile_set)


def build_encoders(names: list[str], layout: RunLayout | None = None) -> list[Encoder]:
    """Encoders by name; a name trained in this run (`fusion pretrain`) resolves to RUN/encoders/<name>."""
    from fusion.features import create_encoder

    out = []
    for n in names:
        if layout is not None and (layout.encoder_dir(n) / "config.json").exists():
            # Features land under the name the user gave (RUN/features/<name>), which is the name
            # `fusion train --encoder` and `models:` read, and two pretrained encoders of one method differ.
            out.append(replace(create_encoder(f"ssl@{layout.encoder_dir(n)}"), name=n))
        else:
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
    from fusion.train.data import load_bags
    from fusion.train.folds import ensure_fold_table
    from fusion.train.loop import MULTIMODAL, cross_validate, model_inputs

    out = layout.model_dir(config.model if config.task == "survival" else f"{config.model}-classification")
    clean_partials(layout)  # checkpoints half-written by a killed training
    # First what must not be read: features of slides whose file is gone, and damaged features files
    # (both change the inputs hash, so a model trained on them is not taken as current).
    fail_missing_slides(layout, cohort, "train", config.tile_set)
    _drop_damaged_features(layout, cohort, config)
    if "tiles" in model_inputs(config.model) and len(cohort.slides):  # never silently trained on no tiles
        _check_features_exist(layout, config.encoder, config.tile_set)
    folds = ensure_fold_table(layout.root, cohort, config.folds, config.seed)  # one table for every model
    inputs_hash = hash_config({"inputs": training_inputs_hash(layout, cohort, config), "folds": folds.fingerprint})
    if not force and _stamp_matches(out / TRAIN_STAMP, inputs_hash) and (out / "cv_metrics.json").exists():
        with contextlib.suppress(ValueError):  # a damaged summary is made again by training
            summary = {**read_json(out / "cv_metrics.json"), "skipped": True}
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


def _check_features_exist(layout: RunLayout, encoder: str, tile_set: str) -> None:
    """Every encoder of `encoder` ('morph+mocov3') has featurised slides of the tile set in this run."""
    for enc in encoder.split("+"):
        folder = layout.features(enc, tile_set)
        if not (folder.is_dir() and any(folder.glob("*.h5"))):
            root = layout.root / "features"
            found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise RunError(f"no features of encoder '{enc}' in {folder} (this run has: "
                           f"{', '.join(found) or 'none'}); run `fusion extract --encoder {enc}` first")


def _drop_damaged_features(layout: RunLayout, cohort: Cohort, config: TrainConfig) -> None:
    """A features file that cannot be read (a torn copy) is that slide's failure, not the model's: it
    moves to RUN/stale/ and training goes on without it (`fusion extract` makes it again)."""
    for sid in map(str, cohort.slides.slide_id):
        for enc in config.encoder.split("+"):
            path = layout.features_h5(enc, sid, config.tile_set)
            if path.exists() and "features" not in _h5_info(path)["shapes"]:
                stale = quarantine(layout, [path])
                layout.ledger.record("train", sid, "failed", error=f"features file {path} cannot be read; "
                                     f"run `fusion extract {layout.root}` to make it again", stale=stale)


def evaluate_stage(layout: RunLayout, cohort: Cohort, model: str) -> dict:
    """Evaluate a trained model's stored predictions (C-index or AUC per fold); recorded in the ledger."""
    from fusion.train.evaluate import evaluate_predictions

    model_dir = layout.model_dir(model)
    if not (model_dir / "predictions.parquet").exists():
        raise RunError(f"no predictions in {model_dir}; run `fusion train` first")
    result = evaluate_predictions(model_dir, cohort)
    layout.ledger.record("evaluate", model, "done", outputs=[str(model_dir / "evaluation.json")],
                         score=result.get("c_index_mean", result.get("auc_mean")))
    return result


def slide_rows(cohort: Cohort) -> list[tuple[str, str]]:
    """(slide_id, absolute path) of every slide of the cohort, in table order."""
    return [(str(s), str(p)) for s, p in zip(cohort.slides.slide_id, cohort.slides.path, strict=True)]


def slide_batches(items: list, slides_per_task: int | None = None) -> list[list]:
    """`items` cut into consecutive batches, one orchestrator task each.

    A task costs the orchestrator a roughly fixed time (Prefect: creating the run, reporting its
    states); a small slide's work is of the same order, so tasks carry several slides. Auto
    (`None`): about n/16 slides per task, between 1 and 16, so a small cohort still spreads over
    every worker and a large one pays the task cost once per 16 slides.
    """
    if not items:
        return []
    size = slides_per_task or max(1, min(16, len(items) // 16))
    return [items[i:i + size] for i in range(0, len(items), size)]


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
    if not (h5_path.exists() and h5_path.with_suffix(QC_SUFFIX).exists() and Path(path).is_file()):
        return None
    expected = hash_config({"slide": file_fingerprint(path), "config": asdict(config), "mpp": mpp,
                            "version": TILER_VERSION})
    info = _h5_info(h5_path)
    if info["attrs"].get("inputs_hash") != expected or "coords" not in info["shapes"]:
        return None
    return info["shapes"]["coords"][0]


def extraction_is_current(layout: RunLayout, slide_id: str, encoders: list[Encoder],
                          config: ExtractConfig | None = None, tile_set: str = "") -> int | None:
    """The tile count when every encoder's features match the slide's current tiles (by hash, and
    by shape: one row per kept tile, the encoder's dimension), else None."""
    stain_normalize = config is not None and config.stain_normalize
    tiles = _h5_info(layout.tiles_h5(slide_id, tile_set))
    if "inputs_hash" not in tiles["attrs"] or "coords" not in tiles["shapes"]:
        return None
    n_tiles = tiles["shapes"]["coords"][0]
    stain = "+macenko" if stain_normalize else ""
    for enc in encoders:
        info = _h5_info(layout.features_h5(enc.name, slide_id, tile_set))
        attrs = info["attrs"]
        if (attrs.get("tiles_hash") != tiles["attrs"]["inputs_hash"]
                or attrs.get("encoder_version") != enc.version + stain):
            return None
        if not _features_match(info, n_tiles, enc.dim):
            return None
    return n_tiles


def _features_match(info: dict, n_tiles: int | None, dim: int) -> bool:
    """A features file holds [N, dim] features and N coords, N = the tiles kept in focus."""
    feats, coords = info["shapes"].get("features"), info["shapes"].get("coords")
    if feats is None or coords is None or len(feats) != 2 or feats[1] != dim or feats[0] != coords[0]:
        return False
    dropped = int(info["attrs"].get("tiles_out_of_focus", 0))
    return n_tiles is None or feats[0] + dropped == n_tiles


def tile_count(layout: RunLayout, slide_id: str, tile_set: str = "") -> int:
    """Tiles in the slide's `.h5` (0 when it has none)."""
    return _h5_info(layout.tiles_h5(slide_id, tile_set))["shapes"].get("coords", (0,))[0]


def training_inputs_hash(layout: RunLayout, cohort: Cohort, config: TrainConfig) -> str:
    """Hash of what a model's cross-validation depends on: each slide's features (by the hashes
    stored in their files), the patients and genomics tables, and the training config."""
    features = {}
    for sid in cohort.slides.slide_id:
        for enc in config.encoder.split("+"):
            for tile_set in (config.tile_set, *config.extra_tile_sets):
                attrs = _h5_info(layout.features_h5(enc, str(sid), tile_set))["attrs"]
                key = f"{sid}/{enc}" if tile_set == config.tile_set else f"{sid}/{enc}/{tile_set}"
                features[key] = [str(attrs.get(k)) for k in ("tiles_hash", "encoder_version", "min_sharpness")]
    return hash_config({"features": features, "patients": table_hash(cohort.patients),
                        "genomics": None if cohort.genomics is None else table_hash(cohort.genomics),
                        "config": asdict(config), "seeds_default": os.environ.get("FUSION_SEEDS", "")})


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


def _h5_info(path: Path) -> dict:
    """A file's attributes and the shapes of its top-level datasets; empty when missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            shapes = {name: tuple(ds.shape) for name, ds in f.items() if isinstance(ds, h5py.Dataset)}
            return {"attrs": dict(f.attrs), "shapes": shapes}
    except (OSError, KeyError, ValueError, RuntimeError):
        return {"attrs": {}, "shapes": {}}


__all__ = ["tile_one", "extract_one", "fail_missing_slides", "slide_batches", "quarantine", "slide_outputs",
           "build_encoders", "train_stage", "evaluate_stage", "slide_rows", "tiling_is_current",
           "extraction_is_current", "training_inputs_hash", "stage_is_current", "mark_stage"]
