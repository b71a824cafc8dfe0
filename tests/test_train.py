import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion.run import open_run
from fusion.stages import evaluate_stage, train_stage
from fusion.train.checkpoint import load_checkpoint
from fusion.train.data import load_bags
from fusion.train.folds import make_fold_table
from fusion.train.loop import TrainConfig, predict_risk

CONFIG = TrainConfig(folds=3, epochs=40, patience=10)


@pytest.fixture(scope="module")
def trained(tiny_run):
    layout, cohort = open_run(tiny_run)
    summary = train_stage(layout, cohort, CONFIG)
    return layout, cohort, summary


def test_abmil_learns_the_synthetic_signal(trained):
    layout, cohort, summary = trained
    result = evaluate_stage(layout, cohort, "abmil")
    # The tiny cohort's risk is mostly visible in the slides: well above chance, near the oracle.
    assert result["c_index_mean"] > 0.65, result
    assert result["fraction_of_oracle"] > 0.6, result  # share of the oracle's discrimination above chance
    assert summary["n_patients"] == 60


def test_fold_artifacts_and_checkpoint_reload(trained):
    layout, cohort, _ = trained
    fold = layout.model_dir("abmil") / "fold-0"
    for name in ("model.safetensors", "config.json", "metrics.json", "predictions.parquet"):
        assert (fold / name).exists()
    model, config = load_checkpoint(fold)
    assert config["model"] == "abmil" and config["train_config"]["folds"] == 3
    preds = pd.read_parquet(fold / "predictions.parquet")
    bags, _ = load_bags(layout, cohort, "morph")
    test = bags.subset([bags.ids.index(p) for p in preds.patient_id])
    import torch

    np.testing.assert_allclose(predict_risk(model, test, torch.device("cpu")), preds.risk, rtol=1e-5, atol=1e-5)


def test_tampered_weights_are_refused(trained, tmp_path):
    import shutil

    layout, _, _ = trained
    fold = tmp_path / "fold"
    shutil.copytree(layout.model_dir("abmil") / "fold-0", fold)
    data = bytearray((fold / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (fold / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_checkpoint(fold)


def test_training_is_repeatable(trained, tmp_path):
    layout, cohort, summary = trained
    bags, _ = load_bags(layout, cohort, "morph")
    from fusion.train.loop import cross_validate

    again = cross_validate(bags, CONFIG, tmp_path)
    assert again["c_index_folds"] == summary["c_index_folds"]
    assert json.loads((tmp_path / "cv_metrics.json").read_text())["config_hash"] == summary["config_hash"]


def test_folds_are_patient_level_and_stratified():
    event = np.array([1] * 20 + [0] * 40, float)
    ids = [f"P{i}" for i in range(60)]
    table = make_fold_table(ids, event, 5, seed=0)
    splits = table.splits(ids)
    seen = np.concatenate([te for _, te in splits])
    assert sorted(seen) == list(range(60))
    assert all(event[te].sum() == 4 for _, te in splits)
    with pytest.raises(ValueError, match="too few for 5 folds"):
        make_fold_table(ids[:8], np.array([1, 1, 0, 0, 0, 0, 0, 0], float), 5)


# The models `make demo` trains (issue 14.4): the networks and the baselines, on the same folds.
DEMO_MODELS = ("biofusion", "coattn", "acmil", "abmil", "genomics_snn", "clinical_cox", "coxnet", "rsf")


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """The demo's model set trained briefly on 40 patients where a fifth lack genomics and some lack
    slides (`morph` features only: the demo's SSL encoders are too slow to pretrain here)."""
    from fusion.cohort import load_cohort
    from fusion.run import init_run
    from fusion.stages import build_encoders, extract_one, slide_rows, tile_one
    from fusion.synth import SynthConfig, synthesize_cohort
    from fusion.wsi import TilingConfig

    root = tmp_path_factory.mktemp("missing")
    cohort_dir = synthesize_cohort(root / "cohort", SynthConfig(patients=40, seed=5, slide_px=1536,
                                                                missing_genomics=0.2, missing_slides=0.1))
    layout = init_run(root / "run", cohort_dir)
    enc = build_encoders(["morph"])
    for sid, path in slide_rows(load_cohort(cohort_dir)):
        tile_one(layout, sid, path, TilingConfig())
        extract_one(layout, sid, path, enc)
    layout, cohort = open_run(root / "run")
    summaries = {m: train_stage(layout, cohort, TrainConfig(model=m, folds=3, epochs=2, patience=2))
                 for m in DEMO_MODELS}
    return layout, cohort, summaries


def test_demo_model_set_trains_on_one_fold_table(demo_set):
    """Smoke test of the demo's comparison: every model trains on the run's folds, scores the patients
    it can read, and the table ranks them all beside the oracle, with a network to report from."""
    import yaml

    from fusion.train.evaluate import best_network, compare_models

    layout, cohort, summaries = demo_set
    demo = yaml.safe_load(open(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"))
    assert {m["model"] for m in demo["models"]} == set(DEMO_MODELS)  # this test follows the demo
    with_slides = set(cohort.slides.patient_id)
    for model in DEMO_MODELS:
        preds = pd.read_parquet(layout.model_dir(model) / "predictions.parquet")
        assert np.isfinite(preds.risk).all(), model
        expected = with_slides if model in ("abmil", "acmil") else set(cohort.patients.patient_id)
        assert set(preds.patient_id) == expected, model
    table = compare_models(layout.root / "models", cohort, n_boot=20)  # refuses models trained on other folds
    assert set(table.model) == set(DEMO_MODELS) and table.oracle_c_index_mean.notna().all()
    assert len({s["fold_table"]["fingerprint"] for s in summaries.values()}) == 1
    networks = ("biofusion", "coattn", "acmil", "abmil", "genomics_snn")  # baselines keep no weights to explain
    assert best_network(layout.root / "models", table.to_dict("records")) in networks


@pytest.mark.parametrize("model", ["coattn", "biofusion", "genomics_snn"])
def test_fusion_models_score_patients_missing_a_modality(model, demo_set):
    """Patients without genomics, and patients without slides, get an out-of-fold risk and a fold-ensemble
    score each, read from the modalities they have (not one constant for everyone missing one)."""
    from fusion.train.predict import predict_patients

    layout, cohort, _ = demo_set
    no_genes = set(cohort.patients.patient_id) - set(cohort.genomics.index)
    no_slides = set(cohort.patients.patient_id) - set(cohort.slides.patient_id)
    assert len(no_genes) >= 3 and len(no_slides) >= 2
    preds = pd.read_parquet(layout.model_dir(model) / "predictions.parquet").set_index("patient_id")
    scores = predict_patients(layout.model_dir(model), layout, cohort).set_index("patient_id")
    assert set(scores.index) == set(cohort.patients.patient_id) and np.isfinite(scores.risk_percentile).all()
    for missing in (no_genes, no_slides):
        risk = preds.risk.loc[sorted(missing)]
        assert np.isfinite(risk).all() and risk.nunique() == len(missing), (model, risk)
        assert scores.risk_fold0.loc[sorted(missing)].nunique() == len(missing)
    _, config = load_checkpoint(layout.model_dir(model) / "fold-0")
    assert config["preprocessor"]["genes"]


def test_unknown_model_name_is_refused_early():
    with pytest.raises(ValueError, match="Unknown model 'cox'; available: abmil, .*clinical_cox, coxnet, rsf"):
        TrainConfig(model="cox")


@pytest.mark.parametrize("model", ["abmil", "acmil"])
def test_classification_head_learns_the_label(model, tiny_run):
    layout, cohort = open_run(tiny_run)
    train_stage(layout, cohort, TrainConfig(model=model, task="classification", folds=3, epochs=30, patience=10))
    result = evaluate_stage(layout, cohort, f"{model}-classification")
    assert result["auc_mean"] > 0.6, result
    preds = pd.read_parquet(layout.model_dir(f"{model}-classification") / "predictions.parquet")
    probs = preds[["prob_luminal_a", "prob_luminal_b"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_survival_predictions_carry_curves(trained):
    layout, _, _ = trained
    preds = pd.read_parquet(layout.model_dir("abmil") / "predictions.parquet")
    for k, fold in preds.groupby("fold"):
        horizons = json.loads((layout.model_dir("abmil") / f"fold-{k}" / "metrics.json").read_text())["horizons"]
        assert 3 <= len(horizons) <= 8 and all(h % 12 == 0 for h in horizons)  # round months, training fold's
        surv = fold.sort_values("risk")[[f"surv_{h:g}" for h in horizons]].to_numpy()
        assert ((surv >= 0) & (surv <= 1)).all()
        assert (np.diff(surv, axis=1) <= 1e-9).all()  # survival never rises with time
        # Higher risk, lower survival at every horizon (within a fold: same baseline hazard).
        assert (np.diff(surv, axis=0) <= 1e-9).all()


def test_predict_scores_new_patients_with_the_fold_ensemble(trained, tmp_path):
    from typer.testing import CliRunner

    from fusion.cli import app

    layout, cohort, _ = trained
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(app, ["predict", str(layout.root), "--model-dir", str(layout.model_dir("abmil")),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(out)
    assert len(scores) == 60 and scores.folds.iat[0] == 3
    assert scores.risk_percentile.between(0, 100).all() and set(scores.risk_group) == {"low", "high"}
    # The ensemble ranks patients much like the out-of-fold predictions do (on the training-fold scale).
    from scipy.stats import spearmanr

    from fusion.survival.crossval import load_out_of_fold, training_percentile

    oof = load_out_of_fold(layout.model_dir("abmil"))
    honest = pd.Series(training_percentile(oof), index=oof.preds.patient_id)
    assert spearmanr(scores.set_index("patient_id").risk_percentile, honest.loc[scores.patient_id])[0] > 0.5
    # every fold's raw risk is kept, and the score is the mean of the folds' percentiles, not of raw risks
    assert {"risk_fold0", "risk_fold1", "risk_fold2"} <= set(scores.columns) and "risk" not in scores
    missing = CliRunner().invoke(app, ["predict", str(layout.root), "--model-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "no fold checkpoints" in missing.output


@pytest.mark.parametrize("model", ["abmil", "acmil"])
def test_discrete_time_nll_training(model, tiny_run, tmp_path):
    """MCAT's discrete-time head: bins from the training fold's event times, risk from hazards."""
    layout, cohort = open_run(tiny_run)
    bags, _ = load_bags(layout, cohort, "morph")
    from fusion.train.loop import cross_validate

    config = TrainConfig(model=model, loss="nll", n_bins=4, folds=3, epochs=60, patience=20, lr=1e-3)
    summary = cross_validate(bags, config, tmp_path)
    assert summary["c_index_mean"] > 0.6, summary
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    for k, fold in preds.groupby("fold"):
        horizons = json.loads((tmp_path / f"fold-{k}" / "metrics.json").read_text())["horizons"]
        surv = fold[[f"surv_{h:g}" for h in horizons]].to_numpy()
        assert ((surv >= 0) & (surv <= 1)).all() and (np.diff(surv, axis=1) <= 1e-9).all()
    _, config = load_checkpoint(tmp_path / "fold-0")
    assert len(config["bin_edges"]) == 3 and config["model_kwargs"]["n_outputs"] == 4


def test_patients_with_unknown_outcome_are_not_trained_on(tiny_run, tmp_path):
    """Blank outcome cells (a patient waiting to be scored) validate and stay out of survival training."""
    import shutil

    from fusion.run import init_run

    src_layout, src = open_run(tiny_run)
    cohort_dir = tmp_path / "cohort"
    shutil.copytree(src.root, cohort_dir)
    patients = pd.read_csv(cohort_dir / "patients.csv", dtype={"patient_id": str})
    unknown = list(patients.patient_id[:3])
    patients.loc[:2, ["os_months", "os_event"]] = None
    patients.to_csv(cohort_dir / "patients.csv", index=False)
    layout = init_run(tmp_path / "run", cohort_dir)
    shutil.copytree(src_layout.root / "features", layout.root / "features")
    layout, cohort = open_run(layout.root)
    summary = train_stage(layout, cohort, TrainConfig(model="clinical_cox", folds=3))
    preds = pd.read_parquet(layout.model_dir("clinical_cox") / "predictions.parquet")
    assert summary["n_patients"] == 57 and not set(unknown) & set(preds.patient_id)


def test_seed_ensemble_size_follows_the_cohort_and_can_be_set(monkeypatch):
    monkeypatch.delenv("FUSION_SEEDS", raising=False)
    auto = TrainConfig(model="genomics_snn")
    assert [auto.ensemble_size(n) for n in (100, 499, 500, 1999, 2000)] == [5, 5, 3, 3, 1]
    assert TrainConfig(model="genomics_snn", seeds=2).ensemble_size(100) == 2
    assert TrainConfig(model="coxnet").ensemble_size(100) == 1  # a deterministic fit is not repeated
    monkeypatch.setenv("FUSION_SEEDS", "1")
    assert auto.ensemble_size(100) == 1
    monkeypatch.setenv("FUSION_SEEDS", "many")
    with pytest.raises(ValueError, match="FUSION_SEEDS must be a whole number"):
        auto.ensemble_size(100)
    with pytest.raises(ValueError, match="seeds must be >= 0"):
        TrainConfig(seeds=-1)


def test_seed_ensemble_trains_members_on_their_own_splits_and_reloads_as_one_model(tiny_run, tmp_path, monkeypatch):
    """Two members per fold: each early-stops on its own inner split; the saved fold reloads as one model
    whose risks are the members' standardised mean and reproduce the fold's test predictions."""
    import dataclasses

    import torch

    from fusion.models.ensemble import SeedEnsemble
    from fusion.train.data import Preprocessor
    from fusion.train.loop import cross_validate

    monkeypatch.delenv("FUSION_SEEDS", raising=False)
    layout, cohort = open_run(tiny_run)
    bags, _ = load_bags(layout, cohort, "morph", keep_without_tiles=True)
    config = TrainConfig(model="genomics_snn", folds=3, epochs=8, seeds=2)
    summary = cross_validate(bags, config, tmp_path)
    metrics = json.loads((tmp_path / "fold-0" / "metrics.json").read_text())
    assert [m["member"] for m in metrics["ensemble"]] == [0, 1]
    model, saved = load_checkpoint(tmp_path / "fold-0")
    assert isinstance(model, SeedEnsemble) and len(model.members) == 2 and saved["ensemble"] == 2
    first, second = (next(m.parameters()) for m in model.members)
    assert not torch.equal(first, second)  # own seeds: different networks
    preds = pd.read_parquet(tmp_path / "fold-0" / "predictions.parquet")
    test = bags.subset([bags.ids.index(p) for p in preds.patient_id])
    test = dataclasses.replace(test, tab=Preprocessor.from_state(saved["preprocessor"]).transform(test))
    risk = predict_risk(model, test, torch.device("cpu"))
    np.testing.assert_allclose(risk, preds.risk, rtol=1e-5, atol=1e-5)
    # the ensemble's risk is the mean of the members' risks, each standardised on the training fold, put back
    # on the members' scale (so the Breslow curves are as spread as one network's, not as a unit-variance score)
    members = np.stack([predict_risk(m, test, torch.device("cpu")) for m in model.members])
    mean, std = model.risk_mean.numpy(), model.risk_std.numpy()
    scaled = (members - mean[:, None]) / std[:, None]
    np.testing.assert_allclose(risk, scaled.mean(0) * std.mean() + mean.mean(), rtol=1e-5, atol=1e-5)
    assert saved["ensemble_risk_scale"] == "members"
    assert np.isfinite(summary["c_index_mean"])
    # the recorded best epoch is the one whose weights were kept (best C, then lower loss), not the first best C
    assert [h["epoch"] for h in metrics["history"] if h["kept"]] == [metrics["best_epoch"]]


def test_seed_ensemble_keeps_the_members_scale_and_leaves_a_collapsed_member_out():
    import torch
    from torch import nn

    from fusion.models.ensemble import SeedEnsemble

    class Scaled(nn.Module):
        def __init__(self, a: float):
            super().__init__()
            self.a = a

        def forward(self, x):
            return {"risk": self.a * x, "attention": torch.full_like(x, self.a)}

    x = torch.linspace(-2, 2, 9)
    ensemble = SeedEnsemble([Scaled(0.5), Scaled(1.5)])
    ensemble.set_risk_scale(torch.tensor([0.0, 0.0]), torch.tensor([0.5, 1.5]))
    out = ensemble(x)
    torch.testing.assert_close(out["risk"], x)  # both members say x in units of 1 after scaling: mean sd 1.0
    torch.testing.assert_close(out["attention"], torch.ones_like(x))  # other outputs: the plain mean
    old = SeedEnsemble([Scaled(0.5), Scaled(1.5)], risk_scale="unit")
    old.set_risk_scale(torch.tensor([0.0, 0.0]), torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(old(x)["risk"], x)  # unit variance: x here has sd 1 by construction of the scale
    collapsed = SeedEnsemble([Scaled(1e-9), Scaled(2.0)])
    collapsed.set_risk_scale(torch.tensor([0.0, 0.0]), torch.tensor([1e-9, 2.0]))
    torch.testing.assert_close(collapsed(x)["risk"], 2.0 * x)  # the constant member is left out, not amplified
    tilted = SeedEnsemble([Scaled(1.0), Scaled(3.0)], risk_scale="unit")
    tilted.set_risk_scale(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(tilted(x)["risk"], 2.0 * x)  # "unit" divides by the stored sd only
