"""`fusion pipeline CONFIG.yaml`: the whole pipeline described by one file (no Prefect here).

Relative paths in the file are resolved against the file's own folder, so a config works from
any working directory (a scheduled deployment does not run where it was started). The config's
sections become the library's own frozen configs (`TilingConfig`, `ExtractConfig`, `TrainConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusion.errors import FusionError


class PipelineConfigError(FusionError, ValueError):
    """A pipeline config file is invalid; the message lists every problem."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TilingSection(_Frozen):
    target_mpp: float = 0.5
    patch_size: int = 256
    min_tissue: float = 0.5
    overlap: float = 0.0
    max_ink: float = 0.05
    preset: str = "resection"
    tissue: dict[str, float | bool] = Field(default_factory=dict)  # overrides of the preset
    mpp: float | None = None  # level-0 um/px for slides without resolution metadata
    tile_set: str = ""

    def build(self):
        from fusion.wsi import TilingConfig
        from fusion.wsi.tissue import preset

        return TilingConfig(target_mpp=self.target_mpp, patch_size=self.patch_size, min_tissue=self.min_tissue,
                            overlap=self.overlap, max_ink=self.max_ink, tissue=preset(self.preset, **self.tissue))


class PretrainSection(_Frozen):
    """A self-supervised encoder trained on the run's tiles before extraction (`fusion pretrain`)."""

    method: Literal["dino", "mocov3"] = "mocov3"
    name: str | None = None  # encoder name in RUN/encoders and in extract.encoders (default: the method)
    epochs: int = 15
    tiles: int = 4096
    size: int = 64
    batch_size: int = 128
    depth: int = 4
    dim: int = 192
    seed: int = 0

    def build(self):
        from fusion.features.ssl import PretrainConfig

        return PretrainConfig(method=self.method, epochs=self.epochs, tiles=self.tiles, size=self.size,
                              batch_size=self.batch_size, depth=self.depth, dim=self.dim, seed=self.seed)

    @property
    def encoder(self) -> str:
        return self.name or self.method


class ExtractSection(_Frozen):
    encoders: list[str] = Field(default_factory=lambda: ["morph"], min_length=1)
    batch_size: int = 128
    num_workers: int = 0
    device: str = "auto"
    min_sharpness: float | None = None
    stain_normalize: bool = False
    gpu_slots: int = 1  # extraction tasks at once on a CUDA device (a Prefect concurrency limit)

    def build(self):
        from fusion.features import ExtractConfig

        return ExtractConfig(batch_size=self.batch_size, num_workers=self.num_workers, device=self.device,
                             min_sharpness=self.min_sharpness, stain_normalize=self.stain_normalize)


class ModelSection(_Frozen):
    """One model to cross-validate: any `TrainConfig` field (model, task, folds, epochs, loss, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model: str = "abmil"
    task: Literal["survival", "classification"] = "survival"

    def build(self, encoder: str, tile_set: str):
        from fusion.train.loop import TrainConfig

        fields = {"encoder": encoder, "tile_set": tile_set, **self.model_dump()}
        try:
            return TrainConfig(**fields)
        except TypeError as e:
            raise PipelineConfigError(f"models: {self.model}: {e}") from None

    @property
    def folder(self) -> str:
        """The model's folder name under RUN/models."""
        return self.model if self.task == "survival" else f"{self.model}-classification"


class AnalysisSection(_Frozen):
    enabled: bool = True
    models: list[str] | None = None  # model folders to analyse (default: every trained one)


class ReportSection(_Frozen):
    enabled: bool = True
    # model folder whose predictions the reports show; "best": the survival network with the highest
    # fold-mean C-index of this run (baselines keep no weights to explain); default: the first model
    model: str | None = None
    patients: list[str] | None = None  # default: every patient
    pdf: bool = False  # also print each report to PDF (needs Chromium; see `fusion doctor`)
    horizons: list[float] | None = None  # absolute risk by these times (cohort's unit); default 1, 3, 5 years


class ServeSection(_Frozen):
    """Scheduled scoring (`fusion serve`): new patients dropped in `inbox` are scored by `model`."""

    inbox: Path
    workdir: Path  # the growing cohort of scored patients (workdir/cohort) and its run (workdir/run)
    model: str | None = None  # model folder in the training run (default: the first model)
    reports: bool = True


class PipelineConfig(_Frozen):
    """Everything `fusion pipeline` needs; see configs/demo.yaml for a commented example."""

    cohort: Path
    run: Path
    tiling: TilingSection = Field(default_factory=TilingSection)
    pretrain: list[PretrainSection] = Field(default_factory=list)
    # Other tilings of the same slides (e.g. {"5x": {target_mpp: 2.0}}), tiled and featurised like the
    # main one; a model reads them with `extra_tile_sets: [5x]` (multi-scale models).
    tile_sets: dict[str, TilingSection] = Field(default_factory=dict)
    extract: ExtractSection = Field(default_factory=ExtractSection)
    models: list[ModelSection] = Field(default_factory=lambda: [ModelSection()])
    train_encoder: str | None = None  # features the models train on (default: the first encoder)
    analysis: AnalysisSection = Field(default_factory=AnalysisSection)
    report: ReportSection = Field(default_factory=ReportSection)
    serve: ServeSection | None = None
    workers: int = Field(2, ge=1)  # per-slide tasks at once in the thread pool
    dask_address: str | None = None  # run per-slide tasks on this Dask scheduler (tcp://host:8786)
    dask_workers: int | None = Field(None, ge=1)  # ... or on a local Dask cluster of this many processes
    strict: bool = False

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[ModelSection]) -> list[ModelSection]:
        folders = [m.folder for m in models]
        if len(set(folders)) != len(folders):
            raise ValueError(f"models: each model folder once, got {folders}")
        # one fold table per run: every model is cross-validated on the same folds
        splits = {(m.model_dump().get("folds", 5), m.model_dump().get("seed", 0)) for m in models}
        if len(splits) > 1:
            raise ValueError(f"models: every model of a run uses the run's fold table, so all must give the same "
                             f"folds and seed; got (folds, seed) {sorted(splits)}")
        return models

    @field_validator("tile_sets")
    @classmethod
    def _tile_set_names(cls, sets: dict[str, TilingSection]) -> dict[str, TilingSection]:
        for name, section in sets.items():
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"tile set name {name!r}: use letters, digits, '-' or '_' (it names a folder)")
            if section.tile_set not in ("", name):
                raise ValueError(f"tile_sets.{name}.tile_set is {section.tile_set!r}: the key names the set")
        return sets

    @model_validator(mode="after")
    def _models_name_known_tile_sets(self) -> PipelineConfig:
        known = set(self.tile_sets)
        for m in self.models:
            wanted = set((m.model_extra or {}).get("extra_tile_sets") or [])
            if wanted - known:
                raise ValueError(f"models: {m.model}: extra_tile_sets {sorted(wanted - known)} are not in "
                                 f"tile_sets (declared: {sorted(known) or 'none'})")
            if self.tiling.tile_set in wanted:
                raise ValueError(f"models: {m.model}: extra_tile_sets repeats the main tile set "
                                 f"{self.tiling.tile_set!r}")
        return self

    @property
    def encoder(self) -> str:
        return self.train_encoder or self.extract.encoders[0]

    def train_configs(self) -> list:
        return [m.build(self.encoder, self.tiling.tile_set) for m in self.models]

    @property
    def report_model(self) -> str:
        return self.report.model or self.models[0].folder

    def resolved(self, base: Path) -> PipelineConfig:
        """A copy with every relative path anchored at `base` (the config file's folder)."""
        update: dict[str, Any] = {"cohort": _anchor(self.cohort, base), "run": _anchor(self.run, base)}
        if self.serve is not None:
            update["serve"] = self.serve.model_copy(update={"inbox": _anchor(self.serve.inbox, base),
                                                            "workdir": _anchor(self.serve.workdir, base)})
        return self.model_copy(update=update)


def _anchor(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def load_pipeline_config(path: str | Path, **overrides: Any) -> PipelineConfig:
    """Read and validate a pipeline config; top-level `overrides` (e.g. dask_workers=2) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineConfigError(f"pipeline config {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{path}: expected a mapping at the top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = PipelineConfig.model_validate(raw)
        config.train_configs()  # every model section must make a valid TrainConfig
        config.tiling.build()
    except ValidationError as e:
        problems = "\n".join(f"  - {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise PipelineConfigError(f"{path} has {len(e.errors())} problem(s):\n{problems}") from None
    except ValueError as e:
        raise PipelineConfigError(f"{path}: {e}") from None
    return config.resolved(path.resolve().parent)
