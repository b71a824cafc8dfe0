import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fusion.features import ExtractConfig, available_encoders, create_encoder, extract_slide, read_features
from fusion.wsi import tile_slide


@pytest.mark.parametrize("name", available_encoders())
def test_encoder_contract(name):
    enc = create_encoder(name)
    x = torch.randint(0, 256, (4, 3, enc.input_size, enc.input_size), dtype=torch.uint8)
    out = enc.model(x)
    assert out.shape == (4, enc.dim) and torch.isfinite(out).all()


def test_unknown_encoder_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown encoder 'nope'; available: .*morph"):
        create_encoder("nope")


def test_morph_features_separate_tissue_types(tiny_run, tiny_cohort):
    """A linear probe on `morph` features tells the synthetic morphologies apart."""
    slides = pd.read_csv(tiny_cohort / "slides.csv")
    X, y = [], []
    for sid in slides.slide_id:
        feats, coords, attrs = read_features(tiny_run / "features" / "morph" / f"{sid}.h5")
        labels = cv2.imread(str(tiny_cohort / "truth" / f"{sid}.labels.png"), cv2.IMREAD_UNCHANGED)
        size = int(attrs["patch_size_level0"]) // 8
        for f, (x0, y0) in zip(feats, coords // 8, strict=True):
            patch = labels[y0 : y0 + size, x0 : x0 + size]
            counts = np.bincount(patch.ravel(), minlength=6)
            if counts.max() >= 0.85 * patch.size and counts.argmax() > 0:  # a nearly pure tile
                X.append(f)
                y.append(counts.argmax())
    assert len(set(y)) >= 4 and len(y) > 100
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    assert cross_val_score(probe, np.array(X), np.array(y), cv=3).mean() > 0.9


def test_extraction_resumes_and_workers_agree(tiny_cohort, tmp_path):
    row = pd.read_csv(tiny_cohort / "slides.csv").iloc[1]
    path = tiny_cohort / row.path
    tile_slide(path, row.slide_id, tmp_path / "tiles")
    tiles = tmp_path / "tiles" / f"{row.slide_id}.h5"
    enc = [create_encoder("morph")]
    first = extract_slide(path, tiles, row.slide_id, tmp_path / "features", enc)
    assert not first["skipped"]
    again = extract_slide(path, tiles, row.slide_id, tmp_path / "features", enc)
    assert again["skipped"]
    a, coords, attrs = read_features(tmp_path / "features" / "morph" / f"{row.slide_id}.h5")
    assert attrs["encoder"] == "morph" and a.shape == (first["n_tiles"], enc[0].dim)
    extract_slide(path, tiles, row.slide_id, tmp_path / "w2", enc, ExtractConfig(num_workers=2, batch_size=16))
    b, _, _ = read_features(tmp_path / "w2" / "morph" / f"{row.slide_id}.h5")
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert not list((tmp_path / "features" / "morph").glob("*.partial"))
