"""A run folder: where every artifact of one pipeline run lives (see README, "Artifacts").

Every path the layout hands out is built from checked names (ids, encoder and tile-set names
follow `fusion.cohort.ID_PATTERN`) and is checked to resolve inside the run folder, so no id,
name or symlink can make a stage write elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusion.cohort import Cohort, check_id, load_cohort
from fusion.errors import RunError
from fusion.storage import Ledger, write_json

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def inside(self, path: str | Path) -> Path:
        """`path` when it resolves inside the run folder (symlinks followed), else RunError."""
        path = Path(path)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise RunError(f"refusing to write {path}: it resolves outside the run folder {self.root}")
        return path

    # A run may tile its slides several ways (e.g. 20x and 40x): each extra "tile set" lives in
    # its own sub-folder, tiles/<set>/ and features/<encoder>/<set>/; the default set has none.
    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    def tiles_dir(self, tile_set: str = "") -> Path:
        return self.inside(self.tiles / check_id(tile_set, "tile set") if tile_set else self.tiles)

    def tiles_h5(self, slide_id: str, tile_set: str = "") -> Path:
        return self.inside(self.tiles_dir(tile_set) / f"{check_id(slide_id, 'slide id')}.h5")

    def features(self, encoder: str, tile_set: str = "") -> Path:
        base = self.root / "features" / check_id(encoder, "encoder name")
        return self.inside(base / check_id(tile_set, "tile set") if tile_set else base)

    def features_h5(self, encoder: str, slide_id: str, tile_set: str = "") -> Path:
        return self.inside(self.features(encoder, tile_set) / f"{check_id(slide_id, 'slide id')}.h5")

    def model_dir(self, model: str) -> Path:
        return self.inside(self.root / "models" / check_id(model, "model name"))

    def encoder_dir(self, name: str) -> Path:
        return self.inside(self.root / "encoders" / check_id(name, "encoder name"))

    def report_path(self, patient_id: str, suffix: str = ".html") -> Path:
        return self.inside(self.reports / f"{check_id(patient_id, 'patient id')}{suffix}")

    @property
    def stale(self) -> Path:
        """Where outputs whose input became invalid are moved (kept for inspection, never read)."""
        return self.root / "stale"

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
        meta = _read_meta(meta_path)
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
    return layout, load_cohort(_read_meta(meta_path)["cohort"])


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("cohort"), str):
        raise RunError(f"{path} is damaged (expected {{\"cohort\": \"/path/to/cohort\"}}); write the cohort "
                       "folder into it again, or start a new run folder")
    return meta
