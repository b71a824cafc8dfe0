"""Several tile sets (magnifications) for one model: config, bags, training, scoring."""

import shutil

import numpy as np
import pandas as pd
import pytest

from fusion.pipeline_config import PipelineConfigError, load_pipeline_config


def _config(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text("cohort: c\nrun: r\n" + text)
    return load_pipeline_config(path)


def test_pipeline_config_names_several_tile_sets_for_one_model(tmp_path):
    config = _config(tmp_path, "tile_sets:\n  5x: {target_mpp: 2.0}\nmodels:\n"
                               "  - {model: biofusion, extra_tile_sets: [5x], model_options: {multiscale: medusa}}\n")
    train = config.train_configs()[0]
    assert train.extra_tile_sets == ("5x",) and train.model_options == {"multiscale": "medusa"}
    assert config.tile_sets["5x"].build().target_mpp == 2.0
    with pytest.raises(PipelineConfigError, match=r"extra_tile_sets \['10x'\] are not in tile_sets"):
        _config(tmp_path, "tile_sets:\n  5x: {target_mpp: 2.0}\n"
                          "models:\n  - {model: biofusion, extra_tile_sets: [10x]}\n")
    with pytest.raises(PipelineConfigError, match="only biofusion read several tile sets"):
        _config(tmp_path, "tile_sets:\n  5x: {target_mpp: 2.0}\nmodels:\n  - {model: abmil, extra_tile_sets: [5x]}\n")
    with pytest.raises(PipelineConfigError, match="has no option"):
        _config(tmp_path, "models:\n  - {model: coattn, model_options: {glca: 0.1}}\n")


@pytest.fixture(scope="module")
def two_scale_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with a second tiling at 2 um/px (5x) and its `morph` features."""
    from fusion.run import open_run
    from fusion.stages import build_encoders, extract_one, slide_rows, tile_one
    from fusion.wsi import TilingConfig

    run = tmp_path_factory.mktemp("two-scale") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("models"))
    layout, cohort = open_run(run)
    encoders = build_encoders(["morph"])
    for sid, path in slide_rows(cohort):
        tile_one(layout, sid, path, TilingConfig(target_mpp=2.0), tile_set="5x")
        extract_one(layout, sid, path, encoders, tile_set="5x")
    return layout, cohort


def test_bags_carry_positions_and_the_other_magnification(two_scale_run):
    from fusion.train.data import SLIDE_GAP_UM, load_bags

    layout, cohort = two_scale_run
    bags, _ = load_bags(layout, cohort, "morph", extra_tile_sets=("5x",))
    assert len(bags.scale_features) == 1 and len(bags.scale_features[0]) == len(bags)
    i = next(i for i, f in enumerate(bags.scale_features[0]) if len(f))
    assert len(bags.scale_features[0][i]) < len(bags.features[i])  # 512-um tiles: fewer than 128-um ones
    assert bags.coords[i].shape == (len(bags.features[i]), 2)
    two = [pid for pid in bags.ids if len(cohort.slides_of(pid)) == 2]
    if two:  # a second slide lies far to the right of the first: never a neighbour
        c = bags.coords[bags.ids.index(two[0])]
        assert c[:, 0].max() >= SLIDE_GAP_UM > np.median(c[:, 0]) or c[:, 0].min() >= SLIDE_GAP_UM
    # 20x tile centres step by 128 um (256 px at 0.5 um/px).
    xs = np.unique(bags.coords[i][:, 0][bags.coords[i][:, 0] < SLIDE_GAP_UM])
    assert np.allclose(np.diff(xs) % 128, 0)


@pytest.mark.parametrize("multiscale", ["crossvit", "medusa"])
def test_biofusion_trains_and_scores_on_two_magnifications(two_scale_run, tmp_path, multiscale):
    from fusion.train.checkpoint import load_checkpoint
    from fusion.train.data import load_bags
    from fusion.train.loop import TrainConfig, cross_validate
    from fusion.train.predict import predict_patients

    layout, cohort = two_scale_run
    bags, _ = load_bags(layout, cohort, "morph", keep_without_tiles=True, extra_tile_sets=("5x",))
    config = TrainConfig(model="biofusion", folds=2, epochs=2, patience=2, extra_tile_sets=("5x",),
                         model_options={"multiscale": multiscale})
    out = tmp_path / "biofusion"
    cross_validate(bags, config, out)
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == len(bags) and np.isfinite(preds.risk).all()
    model, saved = load_checkpoint(out / "fold-0")
    assert saved["model_kwargs"]["scale_dims"] == [39] and model.scale_dims == [39]
    assert saved["train_config"]["extra_tile_sets"] == ["5x"]
    scores = predict_patients(out, layout, cohort)  # the fold ensemble reads the 5x tiles again
    assert len(scores) == len(bags) and np.isfinite(scores.risk_percentile).all()
