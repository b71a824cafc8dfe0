"""Ablation of the attention blocks on synthetic cohorts whose risk needs them (issue 15.5).

Each seed synthesises a cohort with the context signal (lymphocytes next to tumour or away from it)
and the scale signal (tumour gathered or dispersed, seen at low magnification) on top of the
default story, tiles it at 20x and at 5x, extracts `morph` features for both, then cross-validates
every variant below on the same folds (one fresh process per variant and seed: its wall time and
peak memory are its own). C-index is reported beside the oracle (the true risk on the same folds).

    python benchmarks/ablation.py                     # 3 seeds x 120 patients (hours on 2 shared cores)
    python benchmarks/ablation.py --patients 80 --slide-px 2048 --epochs 30   # the README's table (~1 h)
    python benchmarks/ablation.py --seeds 0 --quick   # a smoke run
    python benchmarks/ablation.py --collect           # only rebuild the table from finished runs

Not part of `make bench` (it trains ~30 models); results go to benchmarks/results/ablation-*.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, write_results  # noqa: E402

# (name, model, model options, extra tile sets, block switched on relative to `base`)
VARIANTS = [
    ("abmil", "abmil", {}, ()),
    ("base", "biofusion", {"tile_layers": 0}, ()),
    ("+ lightning", "biofusion", {}, ()),
    ("+ lightning, posterior means", "biofusion", {"vae_noise": 0.0}, ()),
    ("+ lightning + GLCA", "biofusion", {"glca": 0.1}, ()),
    ("+ lightning + GLCA + PWCA", "biofusion", {"glca": 0.1, "pwca": True}, ()),
    ("+ lightning + CrossViT 5x", "biofusion", {}, ("5x",)),
    ("+ lightning + MEDUSA 5x", "biofusion", {"multiscale": "medusa"}, ("5x",)),
    ("+ lightning, modal CLS", "biofusion", {"modal_fusion": "cls"}, ()),
    ("coattn", "coattn", {}, ()),
    ("coattn, modal CLS", "coattn", {"fusion": "cls"}, ()),
    ("coxnet (reference)", "coxnet", {}, ()),  # penalised Cox on genes + clinical: the baseline to beat
]
ROOT = OUT / "ablation"


def cohort_config(seed: int, patients: int, slide_px: int):
    from fusion.synth import SynthConfig

    # Image, genes and clinical data keep some risk each; the two new signals carry as much again.
    return SynthConfig(patients=patients, seed=seed, slide_px=slide_px, extra_slide_prob=0.1,
                       risk_weights=(0.7, 0.7, 0.3, 0.02), context_signal=1.0, scale_signal=1.0, workers=1)


def prepare(seed: int, patients: int, slide_px: int) -> Path:
    """Cohort + run with 20x and 5x tiles and `morph` features (resumable: every stage skips done work)."""
    from fusion.cohort import load_cohort
    from fusion.run import init_run, open_run
    from fusion.stages import build_encoders, extract_one, slide_rows, tile_one
    from fusion.synth import synthesize_cohort
    from fusion.wsi import TilingConfig

    base = ROOT / f"seed-{seed}-p{patients}-{slide_px}"
    if not (base / "cohort" / "cohort.yaml").exists():
        synthesize_cohort(base / "cohort", cohort_config(seed, patients, slide_px))
    layout = init_run(base / "run", base / "cohort") if not (base / "run" / "run.json").exists() else \
        open_run(base / "run")[0]
    encoders = build_encoders(["morph"])
    for sid, path in slide_rows(load_cohort(base / "cohort")):
        for tile_set, mpp in (("", 0.5), ("5x", 2.0)):
            tile_one(layout, sid, path, TilingConfig(target_mpp=mpp), tile_set=tile_set)
            extract_one(layout, sid, path, encoders, tile_set=tile_set)
    return base


def train_one(base: Path, variant: str, folds: int, epochs: int) -> dict:
    """Cross-validate one variant (in this process) and return its scores, time and peak memory."""
    import re

    import torch

    from fusion.run import open_run
    from fusion.train.baselines import BASELINES, cross_validate_baseline
    from fusion.train.data import load_bags
    from fusion.train.evaluate import evaluate_predictions
    from fusion.train.loop import MULTIMODAL, TrainConfig, cross_validate

    torch.set_num_threads(1)
    name, model, options, extra = next(v for v in VARIANTS if v[0] == variant)
    layout, cohort = open_run(base / "run")
    bags, _ = load_bags(layout, cohort, "morph", keep_without_tiles=model in MULTIMODAL or model in BASELINES,
                         extra_tile_sets=extra)
    config = TrainConfig(model=model, folds=folds, epochs=epochs, patience=10, model_options=dict(options),
                         extra_tile_sets=extra)
    open("/proc/self/clear_refs", "w").write("5")  # peak memory of the training from here
    base_rss = int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
    start = time.perf_counter()
    out = base / "models" / variant.replace(" ", "_").replace("+", "p").replace(",", "")
    if model in BASELINES:  # no epochs: one fit per fold (penalty by inner CV for coxnet)
        cross_validate_baseline(bags, model, folds, config.seed, config.max_genes, out)
    else:
        cross_validate(bags, config, out)
    seconds = time.perf_counter() - start
    peak = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
    result = evaluate_predictions(out, cohort)
    epochs_run = [len(json.loads((out / f"fold-{k}" / "metrics.json").read_text()).get("history", [0]))
                  for k in range(folds)]
    return {"variant": variant, "c_index": result["c_index_mean"], "c_folds": [f["c_index"] for f in result["folds"]],
            "oracle": result["oracle_c_index_mean"], "seconds": seconds, "epochs": int(sum(epochs_run)),
            "peak_mib": peak - base_rss, "n_patients": len(bags)}


def run_child(base: Path, variant: str, folds: int, epochs: int) -> dict:
    done = base / "results" / f"{variant.replace(' ', '_')}.json"
    if done.exists():
        return json.loads(done.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--one", str(base), variant, "--folds", str(folds), "--epochs", str(epochs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} on {base.name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result))
    print(f"{base.name} {variant}: C {result['c_index']:.3f} (oracle {result['oracle']:.3f}), "
          f"{result['seconds']:.0f} s, {result['peak_mib']:.0f} MiB", flush=True)
    return result


def table(results: list[dict], folds: int) -> list[dict]:
    """One row per variant: mean and sd over seeds of the fold-mean C, the oracle, cost."""
    rows = []
    base = {r["seed"]: r["c_index"] for r in results if r["variant"] == "base"}
    for variant, *_ in VARIANTS:
        rs = [r for r in results if r["variant"] == variant]
        if not rs:
            continue
        c = np.array([r["c_index"] for r in rs])
        oracle = np.array([r["oracle"] for r in rs])
        delta = [r["c_index"] - base[r["seed"]] for r in rs if r["seed"] in base]
        sd = c.std(ddof=1) if len(c) > 1 else 0.0
        rows.append({"variant": variant, "seeds": len(rs), "C (mean ± sd over seeds)": f"{c.mean():.3f} ± {sd:.3f}",
                     "oracle": f"{oracle.mean():.3f}", "% of oracle above chance":
                     f"{100 * ((c - 0.5) / (oracle - 0.5)).mean():.0f} %",
                     "C - base (per seed)": " / ".join(f"{d:+.3f}" for d in delta),
                     "s per fold": float(np.mean([r["seconds"] for r in rs])) / folds,
                     "s per epoch": float(np.mean([r["seconds"] / max(r["epochs"], 1) for r in rs])),
                     "peak MiB": float(np.max([r["peak_mib"] for r in rs]))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=2, metavar=("BASE", "VARIANT"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--slide-px", type=int, default=4096)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--collect", action="store_true")
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(train_one(Path(args.one[0]), args.one[1], args.folds, args.epochs)))
        return
    if args.quick:
        args.patients, args.slide_px, args.epochs = 40, 2048, 5
    results = []
    for seed in args.seeds:
        base = prepare(seed, args.patients, args.slide_px) if not args.collect else \
            ROOT / f"seed-{seed}-p{args.patients}-{args.slide_px}"
        if args.prepare_only:
            continue
        if args.collect:
            found = [json.loads(p.read_text()) for p in sorted((base / "results").glob("*.json"))]
        else:
            with ThreadPoolExecutor(args.jobs) as pool:
                found = list(pool.map(lambda v, b=base: run_child(b, v, args.folds, args.epochs), args.variants))
        results += [{**r, "seed": seed} for r in found]
    if args.prepare_only:
        return
    rows = table(results, args.folds)
    notes = (f"{len(args.seeds)} synthetic cohorts (seeds {', '.join(map(str, args.seeds))}) of {args.patients} "
             f"patients, slides of {args.slide_px} px at 0.5 um/px, with the context and scale signals (weight 1 "
             "each) over image 0.7, genes 0.7, grade 0.3, age 0.02; `morph` features at 20x (128 um tiles) and 5x "
             f"(512 um tiles). {args.folds}-fold CV, the same folds for every variant of a seed; up to "
             f"{args.epochs} epochs, early stopping after 10 on the inner validation C; other settings are "
             "TrainConfig's defaults. Each variant in its own process, one thread (two variants at a time): "
             "time and peak memory (resident, above the loaded bags) are that process's. 'C - base' is each "
             "seed's difference from biofusion without tile self-attention.")
    print(write_results("ablation" + ("-quick" if args.quick else ""), rows, list(rows[0]) if rows else [],
                        notes).read_text())


if __name__ == "__main__":
    main()
