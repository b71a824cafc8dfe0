"""A run folder: where every artifact of one pipeline run lives (see README, "Artifacts").

Every path the layout hands out is built from checked names (ids, encoder and tile-set names
follow `fusion.cohort.ID_PATTERN`) and is checked to resolve inside the run folder, so no id,
name or symlink can make a stage write elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusion.cohort import COHORT_FILE, Cohort, check_id, load_cohort
from fusion.errors import RunError
from fusion.storage import Ledger, sweep_partials, write_json

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
    """Create (or reopen) a run folder bound to a cohort, once the cohort is valid (see `start_run`)."""
    return start_run(run, cohort_dir)[0]


def start_run(run: str | Path, cohort_dir: str | Path | Cohort) -> tuple[RunLayout, Cohort]:
    """Validate the cohort, then create (or reopen) the run folder bound to it; a run never changes cohort.

    Check first, bind after: a mistyped cohort path or an invalid cohort raises here and writes
    nothing, so the corrected command is not refused. A run that an earlier version bound to a
    folder that does not exist, and that holds nothing else, is bound to the valid cohort instead.
    Temporary files left by killed processes are cleared (`clean_partials`). `cohort_dir` may be
    a cohort already validated.
    """
    layout = RunLayout(Path(run).resolve())
    cohort = cohort_dir if isinstance(cohort_dir, Cohort) else load_cohort(cohort_dir)
    target = str(cohort.root)
    meta_path = layout.root / RUN_FILE
    bound = _read_meta(meta_path)["cohort"] if meta_path.exists() else None
    if bound is not None and bound != target and not _never_started(layout, bound):
        raise RunError(f"run {layout.root} belongs to cohort {bound}, not {target}; "
                       "use a new --out folder for another cohort")
    if bound != target:
        write_json(meta_path, {"cohort": target})
        if bound is not None:
            layout.ledger.record("run", str(layout.root), "rebound", cohort=target, was=bound)
    clean_partials(layout)
    return layout, cohort


def _never_started(layout: RunLayout, bound: str) -> bool:
    """A run bound to a folder that is not a cohort and holding nothing but its binding (and a ledger)."""
    if (Path(bound) / COHORT_FILE).is_file():
        return False
    return {p.name for p in layout.root.iterdir()} <= {RUN_FILE, "ledger.jsonl"}


def clean_partials(layout: RunLayout) -> list[str]:
    """Delete temporary files under the run that no live process will finish (see
    `fusion.storage.sweep_partials`); each is named in the ledger. Returns them, relative to the run."""
    removed = [str(p.relative_to(layout.root)) for p in sweep_partials(layout.root)]
    if removed:
        layout.ledger.record("cleanup", "partials", "done", removed=removed)
    return removed


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
