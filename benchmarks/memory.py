"""Peak memory of training at whole-slide scale (issue 17.5): a 2-fold, 1-epoch cross-validation of each
model on 24 patients of 10^5 tiles (384-D float16 features on disk, as `fusion extract` writes them), each
in a fresh process, against the 4 GiB limit; then, for `abmil`, peak memory against tiles per patient
(10^3, 10^4, 10^5 at 24 patients) and against patients (12, 18, 24 at 10^5 tiles; fewer cannot give
both folds and their inner validation split events and censored patients), which must stay flat.

Features are synthesised straight into a run folder's layout (features/morph/<slide>.h5, one slide per
patient; no slide images), with genomics (128 genes in 8 groups) and two clinical columns for the
fusion models. Training is the run's own (`load_bags` + `cross_validate`, default `max_tiles` 1,024).

    python benchmarks/memory.py [--quick] [--baseline DIR]

`--baseline DIR` also runs a folder holding another version's `fusion` package (e.g. `git archive main
fusion | tar -x -C DIR`) on the same inputs, for a before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, RESET_PEAK, RESULTS, baseline_arg, load_average, machine_tag, run_isolated, write_results  # noqa: E402

LIMIT_MIB = 4096
DIM, GENES, GROUPS = 384, 128, 8
MODELS = ["abmil", "acmil", "coattn", "biofusion"]

TRAIN = """
import json, tempfile, time
import numpy as np, pandas as pd, torch
from fusion.cohort import Cohort, CohortSpec
from fusion.run import RunLayout
from fusion.train.data import load_bags
from fusion.train.loop import MULTIMODAL, TrainConfig, cross_validate
torch.set_num_threads(2)
root, n_patients, model = {root!r}, {patients}, {model!r}
patients = pd.read_csv(root + "/patients.csv", dtype={{"patient_id": str}})
if n_patients < len(patients):  # a smaller cohort keeps a third censored, so that every fold has both
    censored = patients[patients.event == 0].head(n_patients // 3)
    patients = pd.concat([patients[patients.event == 1].head(n_patients - len(censored)), censored])
patients.index = patients["patient_id"].to_numpy()
genomics = pd.read_csv(root + "/genomics.csv", dtype={{"patient_id": str}}).set_index("patient_id")
genomics.index.name = None
slides = pd.DataFrame({{"slide_id": patients["patient_id"], "patient_id": patients["patient_id"],
                        "path": patients["patient_id"] + ".tiff"}}).reset_index(drop=True)
spec = CohortSpec(clinical={{"age": "numeric", "grade": "categorical"}})
cohort = Cohort(__import__("pathlib").Path(root), spec, slides, patients, genomics.loc[patients.index])
""" + RESET_PEAK + """
t = time.perf_counter()
bags, _ = load_bags(RunLayout(__import__("pathlib").Path(root)), cohort, "morph",
                    keep_without_tiles=model in MULTIMODAL)
config = TrainConfig(model=model, folds=2, epochs=1, device="cpu", batch_size=32)
with tempfile.TemporaryDirectory() as out:
    summary = cross_validate(bags, config, out)
print(json.dumps({{"seconds": time.perf_counter() - t, "c_index": summary["c_index_mean"]}}))
"""


def make_run(patients: int, tiles: int) -> Path:
    """A run folder with `patients` one-slide patients of `tiles` float16 384-D tiles each (made once)."""
    from fusion.features.extract import write_features

    root = OUT / "memory" / f"{patients}x{tiles}"
    done = root / "done"
    if done.exists():
        return root
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    feats_dir = root / "features" / "morph"
    feats_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"P{i:03d}" for i in range(patients)]
    side = int(np.ceil(np.sqrt(tiles)))
    grid = np.stack(np.divmod(np.arange(tiles), side), 1)[:, ::-1] * 256
    for pid in ids:
        x = rng.standard_normal((tiles, DIM), dtype=np.float32).astype(np.float16)
        write_features(feats_dir / f"{pid}.h5", x, grid, {"patch_size_level0": 256, "level0_mpp": 0.5,
                                                          "tiles_hash": pid, "encoder_version": "bench"})
    time_ = rng.exponential(30, patients).round(2) + 1
    event = (rng.random(patients) < 0.6).astype(int)
    event[:2] = 1  # every fold has events
    import pandas as pd

    pd.DataFrame({"patient_id": ids, "time": time_, "event": event, "age": rng.normal(60, 10, patients).round(),
                  "grade": rng.choice(["1", "2", "3"], patients)}).to_csv(root / "patients.csv", index=False)
    genes = {f"G{g}_gene{j}": rng.standard_normal(patients) for g in range(GROUPS) for j in range(GENES // GROUPS)}
    pd.DataFrame({"patient_id": ids, **genes}).to_csv(root / "genomics.csv", index=False)
    done.write_text("ok")
    print(f"synthesised {patients} x {tiles} tiles in {time.perf_counter() - t:.0f} s", flush=True)
    return root


def measure(root: Path, patients: int, model: str, baseline: str | None = None) -> dict:
    """Peak RSS (whole process, MiB) and seconds of one 2-fold, 1-epoch cross-validation."""
    r = run_isolated(TRAIN.format(root=str(root), patients=patients, model=model), baseline=baseline)
    return {"peak MiB": r["peak_rss_mib"], "base MiB": r["base_rss_mib"], "seconds": r["seconds"]}


def row(case: str, model: str, patients: int, tiles: int, got: dict, before: dict | None) -> dict:
    out = {"case": case, "model": model, "patients": patients, "tiles/patient": tiles,
           "peak MiB": got["peak MiB"], "limit MiB": LIMIT_MIB, "under limit": got["peak MiB"] < LIMIT_MIB,
           "seconds": got["seconds"], "load": load_average()}
    if before is not None:
        out["before peak MiB"] = before["peak MiB"]
        out["before seconds"] = before["seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="10^4 tiles per patient instead of 10^5")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cases run at once (each in its own process: peaks are per process; seconds grow)")
    parser.add_argument("--only", choices=["24 patients", "vs tiles", "vs patients"],
                        help="measure one series again, keeping the other rows of the last results file")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="models of the 24-patient case to measure (with --only, the other rows are kept)")
    baseline_arg(parser)
    parser.add_argument("--baseline-models", default="abmil",
                        help="models measured with --baseline at full size (the old code peaks at 8-10 GiB each)")
    args = parser.parse_args()
    big = 10_000 if args.quick else 100_000
    base_models = args.baseline_models.split(",") if args.baseline else []
    full = make_run(24, big)
    cases = [("24 patients", model, 24, big, full) for model in args.models.split(",")]
    cases += [("vs tiles", "abmil", 24, tiles, make_run(24, tiles)) for tiles in ([1_000] if args.quick else
                                                                                 [1_000, 10_000])]
    cases += [("vs patients", "abmil", patients, big, full) for patients in (12, 18)]

    def one(case: tuple) -> dict:
        name, model, patients, tiles, root = case
        before = measure(root, patients, model, args.baseline) \
            if args.baseline and (name != "24 patients" or model in base_models) else None
        got = row(name, model, patients, tiles, measure(root, patients, model), before)
        print(json.dumps(got), flush=True)
        return got

    if args.only:  # measure these cases again; the others are kept from the last results file
        cases = [c for c in cases if c[0] == args.only]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, cases))
    last = RESULTS / f"memory{'-quick' if args.quick else ''}-{machine_tag()}.json"
    if args.only and last.exists():
        measured = {(r["case"], r["model"], r["patients"], r["tiles/patient"]) for r in rows}
        rows = [r for r in json.loads(last.read_text())["rows"]
                if (r["case"], r["model"], r["patients"], r["tiles/patient"]) not in measured] + rows
    order = ["24 patients", "vs tiles", "vs patients"]
    rows.sort(key=lambda r: (order.index(r["case"]), r["patients"], r["tiles/patient"]))
    notes = (f"Peak resident memory of the whole process (imports included, ~0.7 GiB) during `load_bags` + a "
             f"2-fold, 1-epoch `cross_validate` (max_tiles 1,024, batch 32), each case in a fresh process on CPU; "
             f"{DIM}-D float16 features on disk, one slide per patient. The 24-patient row of abmil also belongs "
             f"to the 'vs tiles' and 'vs patients' series. Target: every model under {LIMIT_MIB} MiB at 24 x 10^5, "
             f"and peak flat in patients. Tile features above the in-memory budget (FUSION_BAGS_IN_MEMORY_MB, "
             f"1,024 MB) stay on disk and are read per batch; below it they are read once into memory. "
             f"{args.jobs} case(s) ran at once on a shared machine: seconds are wall time under that load.")
    if args.baseline:
        notes += f" 'before' columns: the `fusion` package in {args.baseline}, same inputs, same run."
    cols = ["case", "model", "patients", "tiles/patient", "peak MiB", "limit MiB", "under limit", "seconds"]
    if args.baseline:
        cols += ["before peak MiB", "before seconds"]
    print(write_results("memory" + ("-quick" if args.quick else ""), rows, cols + ["load"], notes).read_text())


if __name__ == "__main__":
    main()
