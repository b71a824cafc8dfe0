"""The pipeline's stages as plain functions over a run folder (no Prefect here).

Per-slide stages never raise for a bad slide: they record the failure in the ledger and return
a summary with status 'failed', so one corrupt file does not stop a cohort. The Prefect flows in
`flows/` and the CLI both call these.
"""

from __future__ import annotations

import errno
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from fusion.cohort import Cohort
from fusion.errors import FusionError, RunError
from fusion.features import ExtractConfig, create_encoder, extract_slide
from fusion.features.encoders import Encoder
from fusion.run import RunLayout
from fusion.train.data import load_bags
from fusion.train.evaluate import evaluate_predictions
from fusion.train.loop import TrainConfig, cross_validate
from fusion.wsi import TilingConfig, tile_slide

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


def train_stage(layout: RunLayout, cohort: Cohort, config: TrainConfig, on_epoch=None) -> dict:
    """Cross-validate `config.model` on the run's features; writes RUN/models/<model>/."""
    from fusion.train.baselines import BASELINES, cross_validate_baseline
    from fusion.train.loop import MULTIMODAL

    bags, missing = load_bags(layout, cohort, config.encoder, config.tile_set,
                              keep_without_tiles=config.model in MULTIMODAL or config.model in BASELINES)
    if len(bags) < config.folds * 2:
        raise RunError(f"only {len(bags)} patients have features for encoder '{config.encoder}' in "
                       f"{layout.root}; run `fusion extract` first (or use fewer folds)")
    out = layout.model_dir(config.model if config.task == "survival" else f"{config.model}-classification")
    if config.model in BASELINES:
        if config.task != "survival":
            raise RunError(f"baseline '{config.model}' is a survival model; use --task survival")
        summary = cross_validate_baseline(bags, config.model, config.folds, config.seed, config.max_genes, out)
    else:
        summary = cross_validate(bags, config, out, on_epoch=on_epoch)
    summary["patients_without_features"] = missing
    layout.ledger.record("train", out.name, "done", outputs=[str(out)], config=asdict(config),
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


__all__ = ["tile_one", "extract_one", "build_encoders", "train_stage", "evaluate_stage", "slide_rows"]
