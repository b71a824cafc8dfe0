"""Fold-honest statistics: no reported number depends on the offset or scale of a fold model's risk,
and every model of a run is compared on the run's one fold table (no training needed: fold models
are simulated as noisy readings of a known linear predictor)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fusion.cohort import load_cohort
from fusion.report.analysis import analyze_run
from fusion.run import RunLayout, init_run
from fusion.storage import write_json, write_table
from fusion.survival.crossval import fraction_of_oracle, load_out_of_fold, paired_difference
from fusion.survival.horizons import nice_horizons, surv_column
from fusion.train.evaluate import compare_models, evaluate_predictions
from fusion.train.folds import ensure_fold_table, make_fold_table, read_fold_table
from fusion.train.loop import risk_cutoffs

N = 240


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    """A clinical-only cohort with survival from a known linear predictor (truth/ holds it)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("crossval") / "cohort"
    (root / "truth").mkdir(parents=True)
    ids = [f"P{i:04d}" for i in range(N)]
    lp = rng.normal(size=N)
    t = rng.exponential(60 * np.exp(-lp))
    c = rng.uniform(6, 150, N)
    grade = rng.integers(1, 4, N)
    pd.DataFrame({"patient_id": ids, "time": np.minimum(t, c).round(2), "event": (t <= c).astype(int),
                  "age": rng.normal(60, 10, N).round(1), "grade": grade}).to_csv(root / "patients.csv", index=False)
    pd.DataFrame(columns=["slide_id", "patient_id", "path"]).to_csv(root / "slides.csv", index=False)
    pd.DataFrame({"patient_id": ids, "true_risk": lp}).to_csv(root / "truth" / "patients.csv", index=False)
    (root / "cohort.yaml").write_text("name: simulated\ntime_unit: months\n"
                                      "clinical: {age: numeric, grade: categorical}\n")
    return root


def _fake_model(layout: RunLayout, name: str, cohort, noise: float, affine: dict[int, tuple[float, float]],
                seed: int = 1) -> None:
    """Write what `fusion train` writes for a model whose fold k scores a + b * (lp + noise)."""
    table = read_fold_table(layout.root)
    truth = pd.read_csv(cohort.root / "truth" / "patients.csv").set_index("patient_id")["true_risk"]
    rng = np.random.default_rng(seed)
    reading = truth + rng.normal(0, noise, len(truth))
    out = layout.model_dir(name)
    preds = []
    for k in range(table.k):
        a, b = affine.get(k, (0.0, 1.0))
        test_ids = table.fold.index[table.fold == k]
        train_ids = table.fold.index[table.fold != k]
        train = cohort.patients.loc[train_ids]
        horizons = nice_horizons(train.time.to_numpy(), train.event.to_numpy(), "months")
        risk = a + b * reading.loc[test_ids].to_numpy()
        p = pd.DataFrame({"patient_id": test_ids, "fold": k, "time": cohort.patients.loc[test_ids, "time"].to_numpy(),
                          "event": cohort.patients.loc[test_ids, "event"].to_numpy(), "risk": risk})
        for h in horizons:  # each fold's own calibrated survival: unaffected by how its risk is scaled
            p[surv_column(h)] = np.exp(-h / 60 * np.exp(reading.loc[test_ids].to_numpy()))
        write_table(out / f"fold-{k}" / "predictions.parquet", p)
        write_json(out / f"fold-{k}" / "metrics.json",
                   {"fold": k, "horizons": horizons,
                    "train_risk_cutoffs": risk_cutoffs(a + b * reading.loc[train_ids].to_numpy())})
        preds.append(p)
    write_table(out / "predictions.parquet", pd.concat(preds))
    write_json(out / "cv_metrics.json", {"model": name, "folds": table.k, "fold_table": table.describe()})


@pytest.fixture(scope="module")
def run(cohort_dir, tmp_path_factory):
    layout = init_run(tmp_path_factory.mktemp("crossval-run") / "run", cohort_dir)
    cohort = load_cohort(cohort_dir)
    ensure_fold_table(layout.root, cohort, 5, 0)
    wild = {0: (5.0, 0.2), 1: (-3.0, 4.0), 2: (0.0, 1.0), 3: (40.0, 0.05), 4: (-1.0, 10.0)}
    _fake_model(layout, "plain", cohort, 0.6, {})
    _fake_model(layout, "rescaled", cohort, 0.6, wild)  # the same fold models, arbitrary offsets and scales
    _fake_model(layout, "weaker", cohort, 1.5, {}, seed=2)
    return layout, cohort


def _same(a, b, path="") -> None:
    """Recursively equal (numbers to 1e-9), ignoring model names."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("model", "_figures"):
                _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_every_statistic_ignores_each_folds_offset_and_scale(run):
    layout, cohort = run
    analyze_run(layout, cohort, models=["plain", "rescaled"], n_boot=200)
    models = {m["model"]: m for m in json.loads((layout.analysis / "metrics.json").read_text())["models"]}
    plain, rescaled = models["plain"], models["rescaled"]
    assert plain["not_estimable"] == {} and len(plain["hazard_ratios"]) > 3 and plain["td_auc_times"]
    _same(plain, rescaled)
    _same(evaluate_predictions(layout.model_dir("plain"), cohort, n_boot=200),
          evaluate_predictions(layout.model_dir("rescaled"), cohort, n_boot=200))
    # ... whereas pooling the raw risks would have told another story
    from fusion.survival import concordance

    raw = {m: pd.read_parquet(layout.model_dir(m) / "predictions.parquet") for m in ("plain", "rescaled")}
    assert abs(concordance(raw["plain"].time, raw["plain"].event, raw["plain"].risk) -
               concordance(raw["rescaled"].time, raw["rescaled"].event, raw["rescaled"].risk)) > 0.03


def test_pooled_and_fold_mean_c_agree_and_oracle_is_chance_corrected(run):
    layout, cohort = run
    result = evaluate_predictions(layout.model_dir("plain"), cohort, n_boot=200)
    assert abs(result["pooled_c_index"] - result["c_index_mean"]) < 0.02, result
    low, high = result["c_index_ci"]
    assert low < result["c_index_mean"] < high and 0.02 < high - low < 0.2
    assert result["fraction_of_oracle"] == pytest.approx((result["c_index_mean"] - 0.5) /
                                                          (result["oracle_c_index_mean"] - 0.5))
    assert fraction_of_oracle(0.75, 0.85) == pytest.approx(0.25 / 0.35)
    assert 0.5 < result["fraction_of_oracle"] < 1.0


def test_compare_pairs_models_on_the_same_folds(run):
    layout, cohort = run
    table = compare_models(layout.root / "models", cohort, layout.analysis, n_boot=200)
    assert list(table.model[:1]) in (["plain"], ["rescaled"]) and table.model.iat[-1] == "weaker"
    weaker = table.set_index("model").loc["weaker"]
    # per-fold differences recomputed here by hand
    best, other = (load_out_of_fold(layout.model_dir(m)) for m in (table.model.iat[0], "weaker"))
    from fusion.survival import concordance

    by_hand = [concordance(p.time, p.event, p.risk) - concordance(q.time, q.event, q.risk)
               for (_, p), (_, q) in zip(best.preds.groupby("fold"), other.preds.groupby("fold"), strict=True)]
    np.testing.assert_allclose(json.loads(weaker.diff_vs_best_folds), np.round(by_hand, 4), atol=1e-4)
    assert weaker.diff_vs_best_mean == pytest.approx(np.mean(by_hand))
    assert 0 < weaker.diff_vs_best_ci_low < weaker.diff_vs_best_mean < weaker.diff_vs_best_ci_high
    assert (layout.analysis / "comparison.csv").exists()
    tie = paired_difference(best, load_out_of_fold(layout.model_dir("rescaled" if best.model == "plain" else "plain")),
                            n_boot=100)
    assert tie["diff_mean"] == pytest.approx(0, abs=1e-12) and tie["diff_ci"] == [0.0, 0.0]


def test_models_from_another_fold_table_are_refused(run, tmp_path):
    import shutil

    from fusion.errors import RunError

    layout, cohort = run
    other = RunLayout(tmp_path / "run")
    shutil.copytree(layout.root, other.root)
    cv = json.loads((other.model_dir("weaker") / "cv_metrics.json").read_text())
    cv["fold_table"]["fingerprint"] = "0123456789abcdef"
    write_json(other.model_dir("weaker") / "cv_metrics.json", cv)
    with pytest.raises(RunError, match="weaker were trained on another fold table"):
        compare_models(other.root / "models", cohort, n_boot=10)
    with pytest.raises(RunError, match="weaker was trained on another fold table"):
        analyze_run(other, cohort, n_boot=10)


def test_fold_table_is_made_once_and_checked(run, tmp_path):
    from fusion.errors import RunError

    layout, cohort = run
    table = read_fold_table(layout.root)
    assert table.k == 5 and len(table.fold) == N and sorted(table.fold.unique()) == [0, 1, 2, 3, 4]
    events = cohort.patients.event.groupby(table.fold).sum()
    assert events.max() - events.min() <= 1  # stratified by event
    assert ensure_fold_table(layout.root, cohort, 5, 0).fingerprint == table.fingerprint  # reused, not remade
    with pytest.raises(RunError, match="has 5 folds with seed 0; training with 10 folds"):
        ensure_fold_table(layout.root, cohort, 10, 0)
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("folds.csv", "folds.json"):
        (edited / name).write_bytes((layout.root / name).read_bytes())
    frame = pd.read_csv(edited / "folds.csv")
    frame.loc[0, "fold"] = (frame.loc[0, "fold"] + 1) % 5
    frame.to_csv(edited / "folds.csv", index=False)
    with pytest.raises(RunError, match="does not match the fingerprint"):
        read_fold_table(edited)
    with pytest.raises(RunError, match="P9999"):
        table.splits(["P0000", "P9999"])


def test_fold_table_keeps_patients_without_any_modality():
    """The table is made from the cohort's patients, not from those a model has features for."""
    ids = [f"P{i}" for i in range(30)]
    event = np.array([1, 0, 0] * 10, float)
    event[:3] = np.nan  # outcome not known yet: their own stratum, still assigned
    table = make_fold_table(ids, event, 3, seed=1)
    assert set(table.fold.index) == set(ids)
    train, test = table.splits(ids[5:])[0]
    assert len(train) + len(test) == 25


def test_horizons_are_round_and_come_from_training_patients_only(run):
    layout, cohort = run
    oof = load_out_of_fold(layout.model_dir("plain"))
    for fold, horizons in oof.horizons.items():
        assert all(h % 12 == 0 for h in horizons) and 3 <= len(horizons) <= 8, horizons
        train = cohort.patients.loc[read_fold_table(layout.root).fold != fold]
        assert horizons == nice_horizons(train.time.to_numpy(), train.event.to_numpy(), "months")
    # 90th percentile of event times 19.6 years: steps of 1 or 2 years would give more than 8 horizons
    assert nice_horizons(np.array([1.0, 2, 3, 4, 30]), np.ones(5), "years") == [5.0, 10.0, 15.0]
    assert nice_horizons(np.linspace(1, 400, 50), np.ones(50), "days") == [60.0, 120.0, 180.0, 240.0, 300.0, 360.0]


def test_degenerate_but_legal_cohorts_are_reported_not_crashed(cohort_dir, tmp_path):
    """A clinical variable with one level, and a model that puts everyone in one risk group: those
    statistics are 'not estimable' with the reason; the rest of the analysis is produced."""
    import shutil

    root = tmp_path / "cohort"
    shutil.copytree(cohort_dir, root)
    patients = pd.read_csv(root / "patients.csv")
    patients["grade"] = 2
    patients.to_csv(root / "patients.csv", index=False)
    layout = init_run(tmp_path / "run", root)
    cohort = load_cohort(root)
    ensure_fold_table(layout.root, cohort, 5, 0)
    _fake_model(layout, "flat", cohort, 0.6, {k: (1.0, 0.0) for k in range(5)})  # every risk 1.0
    _fake_model(layout, "plain", cohort, 0.6, {})
    analyze_run(layout, cohort, n_boot=20)
    models = {m["model"]: m for m in json.loads((layout.analysis / "metrics.json").read_text())["models"]}
    flat, plain = models["flat"], models["plain"]
    assert any("risk group" in k for k in flat["not_estimable"]) and flat["logrank_p"] is None
    assert "hazard ratio of grade" in plain["not_estimable"]
    assert "single level" in plain["not_estimable"]["hazard ratio of grade"]
    assert plain["hr_high_vs_low"]["hr"] > 1 and plain["harrell_c"] > 0.6
    html = (layout.analysis / "report.html").read_text()
    assert "Not estimable: hazard ratio of grade" in html


def test_fold_models_load_by_number_and_must_match_the_manifest(tmp_path):
    """With 11 folds, fold-10 comes after fold-9 (not after fold-1); a deleted, extra or foreign fold
    folder is refused with what is wrong instead of silently changing patients' risk groups."""
    import shutil

    from fusion.errors import RunError
    from fusion.train.checkpoint import fold_dirs

    model = tmp_path / "abmil"
    for k in range(11):
        (model / f"fold-{k}").mkdir(parents=True)
        (model / f"fold-{k}" / "model.safetensors").write_bytes(b"weights")
        write_json(model / f"fold-{k}" / "config.json", {"config_hash": "c1", "fold_table": "t1"})
    write_json(model / "cv_metrics.json", {"folds": 11, "config_hash": "c1", "fold_table": {"fingerprint": "t1"}})
    assert [p.name for p in fold_dirs(model)] == [f"fold-{k}" for k in range(11)]

    shutil.copytree(model / "fold-10", model / "fold-11")
    with pytest.raises(RunError, match="unexpected fold"):
        fold_dirs(model)
    shutil.rmtree(model / "fold-11")
    shutil.rmtree(model / "fold-3")
    with pytest.raises(RunError, match=r"trained with 11 folds but has missing fold\(s\) 3"):
        fold_dirs(model)
    shutil.copytree(model / "fold-4", model / "fold-3")
    write_json(model / "fold-3" / "config.json", {"config_hash": "other", "fold_table": "t1"})
    with pytest.raises(RunError, match="another configuration"):
        fold_dirs(model)
    write_json(model / "fold-3" / "config.json", {"config_hash": "c1", "fold_table": "t2"})
    with pytest.raises(RunError, match="another fold table"):
        fold_dirs(model)
