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


def _tiled_slide(cohort, index, tmp_path):
    """(slides.csv row, slide path, tiles .h5) of one slide of `cohort`, tiled into tmp_path/tiles."""
    row = pd.read_csv(cohort / "slides.csv").iloc[index]
    tile_slide(cohort / row.path, row.slide_id, tmp_path / "tiles")
    return row, cohort / row.path, tmp_path / "tiles" / f"{row.slide_id}.h5"


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
    row, path, tiles = _tiled_slide(tiny_cohort, 1, tmp_path)
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


def test_out_of_focus_tiles_are_measured_and_dropped(tmp_path):
    """A slide with a soft band (a scanner focus failure): its tiles have far lower sharpness, and
    `min_sharpness` drops them while keeping the sharp ones."""
    import json

    import h5py

    from fusion.synth import SynthConfig, synthesize_cohort

    cohort = synthesize_cohort(tmp_path / "c", SynthConfig(patients=1, slide_px=4096, blur_prob=1.0,
                                                           extra_slide_prob=0, pen_prob=0, workers=1))
    (sid, info), = json.loads((cohort / "truth" / "slides.json").read_text()).items()
    path = cohort / "slides" / f"{sid}.tiff"
    tile_slide(path, sid, tmp_path / "tiles")
    tiles = tmp_path / "tiles" / f"{sid}.h5"
    enc = [create_encoder("morph")]
    extract_slide(path, tiles, sid, tmp_path / "all", enc)
    with h5py.File(tmp_path / "all" / "morph" / f"{sid}.h5") as f:
        sharp, coords = f["sharpness"][:], f["coords"][:]
    b0, b1 = info["out_of_focus_x"]
    inside = (coords[:, 0] >= b0) & (coords[:, 0] + 256 <= b1)
    outside = (coords[:, 0] + 256 <= b0) | (coords[:, 0] >= b1)
    assert inside.sum() > 5 and outside.sum() > 20
    assert np.percentile(sharp[inside], 95) < 0.2 * np.percentile(sharp[outside], 5)

    result = extract_slide(path, tiles, sid, tmp_path / "sharp", enc, ExtractConfig(min_sharpness=5.0))
    _, kept, attrs = read_features(tmp_path / "sharp" / "morph" / f"{sid}.h5")
    kept = {tuple(c) for c in kept}
    assert not any(tuple(c) in kept for c in coords[inside])
    assert all(tuple(c) in kept for c in coords[outside])
    assert result["tiles_out_of_focus"] == attrs["tiles_out_of_focus"] >= inside.sum()


def _stained_tiles(he: np.ndarray, amounts: tuple[float, float], n: int = 32, size: int = 64) -> torch.Tensor:
    """Beer-Lambert phantom tiles: haematoxylin nuclei on eosin cytoplasm, some glass."""
    import cv2

    tiles = []
    for i in range(n):
        rng = np.random.default_rng(i)
        h = np.zeros((size, size), np.float32)
        for _ in range(12):
            cv2.circle(h, (int(rng.integers(0, size)), int(rng.integers(0, size))), int(rng.integers(2, 5)), 1.0, -1)
        h = cv2.GaussianBlur(h, (0, 0), 0.8) * 1.2
        e = (0.35 + 0.2 * cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 4)) * (1 - h.clip(0, 1))
        conc = np.stack([h * amounts[0], e * amounts[1]])
        conc[:, rng.random((size, size)) < 0.2] = 0
        tiles.append((240 * np.exp(-np.einsum("cs,shw->hwc", he, conc))).clip(0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def test_macenko_recovers_stains_and_maps_two_labs_together():
    from fusion.features.stain import MacenkoNormalizer, estimate_stains

    def unit(v):
        return v / np.linalg.norm(v, axis=0, keepdims=True)

    def pixels(t):
        return t.permute(0, 2, 3, 1).numpy()

    he_a = unit(np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]))  # Ruifrok's H and E
    he_b = unit(np.array([[0.55, 0.15], [0.78, 0.95], [0.30, 0.25]]))  # another lab's reagents
    lab_a, lab_b = _stained_tiles(he_a, (1.0, 1.0)), _stained_tiles(he_b, (1.4, 0.7))
    he, _ = estimate_stains(pixels(lab_a))
    cosines = (unit(he) * he_a).sum(0)
    assert (cosines > 0.995).all(), cosines  # both stain vectors, in the right order (H first)
    a = MacenkoNormalizer.fit(pixels(lab_a))(lab_a).float()
    b = MacenkoNormalizer.fit(pixels(lab_b))(lab_b).float()
    assert (a - b).abs().mean() < 0.2 * (lab_a.float() - lab_b.float()).abs().mean()


def test_extraction_with_stain_normalisation(tiny_cohort, tmp_path):
    row, path, tiles = _tiled_slide(tiny_cohort, 0, tmp_path)
    enc = [create_encoder("morph")]
    extract_slide(path, tiles, row.slide_id, tmp_path / "raw", enc)
    result = extract_slide(path, tiles, row.slide_id, tmp_path / "norm", enc, ExtractConfig(stain_normalize=True))
    raw, _, _ = read_features(tmp_path / "raw" / "morph" / f"{row.slide_id}.h5")
    norm, _, attrs = read_features(tmp_path / "norm" / "morph" / f"{row.slide_id}.h5")
    assert attrs["encoder_version"].endswith("+macenko") and not result["skipped"]
    assert np.isfinite(norm).all() and not np.allclose(raw, norm)


def test_reader_threads_processes_and_openslide_give_the_same_tiles_and_features(tiny_cohort, tmp_path):
    """Tiles read through the stored-tile path equal openslide's; features do not depend on how tiles are
    read (no thread, a reader thread, two, worker processes)."""
    from fusion.features.extract import TileDataset
    from fusion.wsi import read_coords

    row, path, tiles = _tiled_slide(tiny_cohort, 2, tmp_path)
    coords, attrs = read_coords(tiles)
    fast = TileDataset(path, coords, attrs, 128, mpp=0.5)
    slow = TileDataset(path, coords, attrs, 128, mpp=0.5, backend="openslide")
    assert fast._handle().backend.direct and not hasattr(slow._handle().backend, "direct")
    for i in range(0, len(coords), max(1, len(coords) // 10)):
        torch.testing.assert_close(fast[i], slow[i], rtol=0, atol=0)
    enc = [create_encoder("morph")]
    feats = []
    configs = [ExtractConfig(read_threads=0, batch_size=16), ExtractConfig(read_threads=2, batch_size=4),
               ExtractConfig(num_workers=1, batch_size=16)]
    for k, config in enumerate(configs):
        extract_slide(path, tiles, row.slide_id, tmp_path / str(k), enc, config)
        feats.append(read_features(tmp_path / str(k) / "morph" / f"{row.slide_id}.h5")[0])
    np.testing.assert_array_equal(feats[0], feats[1])
    np.testing.assert_array_equal(feats[0], feats[2])


def test_cuda_code_path_runs_on_cpu(tiny_cohort, tmp_path):
    """bf16 autocast (what CUDA runs) on the CPU gives features close to fp32, through the same loop."""
    row, path, tiles = _tiled_slide(tiny_cohort, 0, tmp_path)
    enc = [create_encoder("timm:vit_tiny_patch16_224@random")]
    for precision in ("fp32", "bf16"):
        extract_slide(path, tiles, row.slide_id, tmp_path / precision, enc,
                      ExtractConfig(precision=precision, batch_size=8))
    fp32, _, _ = read_features(tmp_path / "fp32" / enc[0].name / f"{row.slide_id}.h5")
    bf16, _, _ = read_features(tmp_path / "bf16" / enc[0].name / f"{row.slide_id}.h5")
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    cosine = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cosine.min() > 0.99, cosine.min()
    with pytest.raises(ValueError, match="precision must be"):
        ExtractConfig(precision="fp16")


class _HostTensor:
    """Stands in for a CPU tensor: records what `to_device` does with it (no GPU on the test machine)."""

    def __init__(self, pinned: bool):
        self.device, self.pinned, self.calls = torch.device("cpu"), pinned, []

    def is_pinned(self) -> bool:
        return self.pinned

    def pin_memory(self):
        self.calls.append("pin_memory")
        self.pinned = True
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking))
        return self


def test_copies_to_cuda_are_pinned_and_non_blocking(monkeypatch):
    from fusion.features import device as dev

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    x = _HostTensor(pinned=False)
    dev.to_device(x, cuda)
    assert x.calls == ["pin_memory", ("to", "cuda", True)]
    y = _HostTensor(pinned=True)  # a buffer from host_buffer(): no second copy into pinned memory
    dev.to_device(y, cuda)
    assert y.calls == [("to", "cuda", True)]
    z = torch.ones(3)
    assert dev.to_device(z, cpu) is z  # on the CPU nothing is copied
    asked = {}
    monkeypatch.setattr(dev.torch, "empty", lambda shape, dtype, pin_memory: asked.update(pin=pin_memory))
    dev.host_buffer((2, 3), torch.uint8, cuda)
    assert asked == {"pin": True}
    dev.host_buffer((2, 3), torch.uint8, cpu)
    assert asked == {"pin": False}
    assert dev.pick_device("cpu") == cpu and dev.pick_device("auto") == (cuda if torch.cuda.is_available() else cpu)
