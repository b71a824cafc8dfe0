"""Self-supervised encoders (trained here, on the run's tiles) and importing CLAM/TRIDENT features."""

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fusion.errors import FusionError
from fusion.features import Encoder, create_encoder
from fusion.features.extract import TileDataset
from fusion.features.importing import import_features
from fusion.features.ssl import PretrainConfig, SSLEncoder, backbone, hed_jitter
from fusion.run import open_run
from fusion.stages import build_encoders, pretrain_stage
from fusion.wsi import read_coords


def _pure_tiles(run, cohort, size, limit=40):
    """uint8 tiles [N, 3, size, size] that are >= 85 % one morphology, and their labels."""
    x, y = [], []
    for row in pd.read_csv(cohort / "slides.csv").head(limit).itertuples():
        coords, attrs = read_coords(run / "tiles" / f"{row.slide_id}.h5")
        labels = cv2.imread(str(cohort / "truth" / f"{row.slide_id}.labels.png"), cv2.IMREAD_UNCHANGED)
        ds = TileDataset(cohort / row.path, coords, attrs, size, mpp=0.5)
        for i, (x0, y0) in enumerate(coords // 8):
            patch = labels[y0 : y0 + 32, x0 : x0 + 32]
            counts = np.bincount(patch.ravel(), minlength=8)
            if counts.max() >= 0.85 * patch.size and 1 <= counts.argmax() <= 5:
                x.append(ds[i])
                y.append(counts.argmax())
    return torch.stack(x), np.array(y)


def _stain_shift_accuracy(encoder, tiles, labels):
    """Probe trained on the tiles as scanned, tested on the same tiles with another lab's staining."""
    torch.manual_seed(1)
    shifted = hed_jitter(tiles.float(), sigma=0.25, bias=0.15).clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        a, b = encoder.model(tiles).numpy(), encoder.model(shifted).numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(a, labels)
    return probe.score(b, labels)


@pytest.mark.slow
def test_mocov3_encoder_beats_random_init_under_stain_shift(tiny_run, tiny_cohort, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("features", "models"))
    layout, cohort = open_run(run)
    config = PretrainConfig(method="mocov3", epochs=6, tiles=1536, seed=0)
    out = pretrain_stage(layout, cohort, config)
    assert (out / "model.safetensors").exists()
    ssl = build_encoders(["mocov3"], layout)[0]  # registered by name within the run, features under that name
    assert ssl.name == "mocov3" and ssl.dim == config.dim
    torch.manual_seed(0)
    random = Encoder("random", SSLEncoder(backbone(config), config.size).eval(), config.size, config.dim, "r")
    tiles, labels = _pure_tiles(run, tiny_cohort, config.size)
    assert len(set(labels)) >= 4 and len(labels) > 100
    acc_ssl, acc_random = _stain_shift_accuracy(ssl, tiles, labels), _stain_shift_accuracy(random, tiles, labels)
    assert acc_ssl > acc_random + 0.03, (acc_ssl, acc_random)


def test_dino_trains_and_loads(tiny_run, tmp_path):
    from fusion.features.ssl import load_ssl_encoder, pretrain

    tiles = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    config = PretrainConfig(method="dino", size=32, epochs=2, batch_size=32, depth=1, dim=48, heads=2)
    out = pretrain(tiles, config, tmp_path / "dino")
    enc = load_ssl_encoder(out)
    assert enc.model(tiles[:4]).shape == (4, 48)
    assert create_encoder(f"ssl@{out}").version == enc.version
    with pytest.raises(ValueError, match="method must be 'dino' or 'mocov3'"):
        PretrainConfig(method="simclr")


def _clam_file(path, n, d, rng):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=rng.normal(size=(n, d)).astype(np.float32))
        f.create_dataset("coords", data=rng.integers(0, 2000, (n, 2)))


def test_import_clam_features(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("features", "models"))
    layout, cohort = open_run(run)
    src = tmp_path / "clam" / "h5_files"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = list(cohort.slides.slide_id)
    for sid in ids[:-1]:
        _clam_file(src / f"{sid}.h5", 20, 1024, rng)
    result = import_features(layout, cohort, src, "uni")
    assert result["dim"] == 1024 and result["missing"] == [ids[-1]] and len(result["imported"]) == len(ids) - 1
    with h5py.File(layout.features_h5("uni", ids[0])) as f:
        assert f["features"].shape == (20, 1024) and f.attrs["encoder"] == "uni"

    with h5py.File(src / f"{ids[1]}.h5", "a") as f:
        del f["coords"]
    with pytest.raises(FusionError, match=f"{ids[1]}.h5: needs 'features' and 'coords'"):
        import_features(layout, cohort, src, "uni")


def test_timm_encoder_from_a_local_safetensors_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    trunk = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file({f"module.{k}": v.contiguous() for k, v in trunk.state_dict().items()}, str(tmp_path / "w.safetensors"))
    enc = create_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / 'w.safetensors'}")
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        expected = trunk((x.float() / 255 - 0.5) / 0.5)
        np.testing.assert_allclose(enc.model(x).numpy(), expected.numpy(), atol=1e-4)
    with pytest.raises(FusionError, match="do not fit timm 'resnet18'"):
        create_encoder(f"timm:resnet18@{tmp_path / 'w.safetensors'}")
    with pytest.raises(FusionError, match="weights not found"):
        create_encoder("uni@/nonexistent/pytorch_model.bin")


@pytest.mark.parametrize("name", ["uni", "uni2", "virchow", "phikon", "hoptimus0"])
def test_foundation_layouts_match_published_sizes(name):
    """Each preset builds the published architecture (on the meta device: no memory, no weights)."""
    import timm

    from fusion.features.pretrained import FOUNDATIONS, _resolve_layers

    millions = {"uni": 303, "uni2": 681, "virchow": 631, "phikon": 86, "hoptimus0": 1135}[name]
    f = FOUNDATIONS[name]
    with torch.device("meta"):
        model = timm.create_model(f.arch, pretrained=False, **{"num_classes": 0, **_resolve_layers(dict(f.kwargs))})
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 1.5


def test_pretraining_is_a_resumable_stage(tiny_cohort, tiny_run, tmp_path):
    """An encoder trained on the same tiles with the same config is reused, not trained again; another
    config trains it again (the pipeline's `pretrain:` section runs this before extraction)."""
    from conftest import copy_small_cohort

    from fusion.pretraining import pretrain_encoder, pretrain_is_current

    _, run = copy_small_cohort(tiny_cohort, tiny_run, tmp_path, patients=4)
    layout, cohort = open_run(run)
    config = PretrainConfig(method="mocov3", size=32, epochs=1, tiles=64, batch_size=32, depth=1, dim=48, heads=2)
    first = pretrain_encoder(layout, cohort, config)
    assert not first["skipped"] and pretrain_is_current(layout, cohort, config, "mocov3")
    weights = layout.encoder_dir("mocov3") / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert pretrain_encoder(layout, cohort, config)["skipped"] and weights.stat().st_mtime_ns == stamp
    assert build_encoders(["mocov3"], layout)[0].dim == 48
    other = PretrainConfig(method="mocov3", size=32, epochs=2, tiles=64, batch_size=32, depth=1, dim=48, heads=2)
    assert not pretrain_is_current(layout, cohort, other, "mocov3")
    assert not pretrain_encoder(layout, cohort, other)["skipped"]


def test_a_pretrained_encoder_is_extracted_and_trained_on_under_its_own_name(tiny_cohort, tiny_run, tmp_path):
    """`pretrain` names an encoder, `extract` writes RUN/features/<that name>, and a multi-encoder model
    reads it by that name: the demo's `morph+mocov3+dino` once found no features (they were written
    under `ssl-mocov3`) and biofusion trained on no tiles without a word. A missing encoder now stops
    training with its name."""
    from conftest import copy_small_cohort

    from fusion.errors import RunError
    from fusion.pretraining import pretrain_encoder
    from fusion.stages import extract_one, slide_rows, train_stage
    from fusion.train.data import load_bags
    from fusion.train.loop import TrainConfig

    _, run = copy_small_cohort(tiny_cohort, tiny_run, tmp_path, patients=4)
    layout, cohort = open_run(run)
    config = PretrainConfig(method="mocov3", size=32, epochs=1, tiles=64, batch_size=32, depth=1, dim=48, heads=2)
    pretrain_encoder(layout, cohort, config, "ssl-a")
    encoders = build_encoders(["morph", "ssl-a"], layout)
    assert [e.name for e in encoders] == ["morph", "ssl-a"]
    for sid, path in slide_rows(cohort):
        extract_one(layout, sid, path, encoders)
    assert any(layout.features("ssl-a").glob("*.h5"))
    bags, missing = load_bags(layout, cohort, "morph+ssl-a")
    assert not missing and bags.encoder_dims == [encoders[0].dim, 48] and bags.dim == encoders[0].dim + 48
    with pytest.raises(RunError, match="no features of encoder 'mocov3'.*morph, ssl-a"):
        train_stage(layout, cohort, TrainConfig(model="biofusion", encoder="morph+mocov3", folds=2, epochs=1))
