"""A run folder: where every artifact of one pipeline run lives (see README, "Artifacts")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusion.cohort import Cohort, load_cohort
from fusion.errors import RunError
from fusion.storage import Ledger, write_json

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    # A run may tile its slides several ways (e.g. 20x and 40x): each extra "tile set" lives in
    # its own sub-folder, tiles/<set>/ and features/<encoder>/<set>/; the default set has none.
    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    def tiles_dir(self, tile_set: str = "") -> Path:
        return self.tiles / tile_set if tile_set else self.tiles

    def tiles_h5(self, slide_id: str, tile_set: str = "") -> Path:
        return self.tiles_dir(tile_set) / f"{slide_id}.h5"

    def features(self, encoder: str, tile_set: str = "") -> Path:
        base = self.root / "features" / encoder
        return base / tile_set if tile_set else base

    def features_h5(self, encoder: str, slide_id: str, tile_set: str = "") -> Path:
        return self.features(encoder, tile_set) / f"{slide_id}.h5"

    def model_dir(self, model: str) -> Path:
        return self.root / "models" / model

    def encoder_dir(self, name: str) -> Path:
        return self.root / "encoders" / name

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.root / "ledger.jsonl")


def init_run(run: str | Path, cohort_dir: str | Path) -> RunLayout:
    """Create (or reopen) a run folder bound to a cohort; a run never changes cohort."""
    layout = RunLayout(Path(run).resolve())
    cohort_dir = str(Path(cohort_dir).resolve())
    meta_path = layout.root / RUN_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("cohort") != cohort_dir:
            raise RunError(f"run {layout.root} belongs to cohort {meta.get('cohort')}, not {cohort_dir}; "
                           "use a new --out folder for another cohort")
    else:
        write_json(meta_path, {"cohort": cohort_dir})
    return layout


def open_run(run: str | Path) -> tuple[RunLayout, Cohort]:
    """The run's layout and its validated cohort."""
    layout = RunLayout(Path(run).resolve())
    meta_path = layout.root / RUN_FILE
    if not meta_path.exists():
        raise RunError(f"{layout.root} is not a run folder (no {RUN_FILE}); start one with "
                       "`fusion tile COHORT --out RUN`")
    meta = json.loads(meta_path.read_text())
    return layout, load_cohort(meta["cohort"])
