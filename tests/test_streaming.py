"""Bags left on disk (issue 17.5): an `H5Bag` stands for the float32 array `load_bags` used to hold, and
inference is batched by tiles. Memory itself is measured in benchmarks/memory.py, never asserted here."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from fusion.cohort import Cohort, CohortSpec
from fusion.features.extract import write_features
from fusion.run import RunLayout
from fusion.train.data import Preprocessor, batch_inputs, feature_moments, load_bags
from fusion.train.loop import TrainConfig, fit, inference_batches, predict_risk
from fusion.train.tiles import H5Bag

ENCODERS = {"morph": 6, "other": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """8 patients, the last two with two slides, featurised by two encoders (float16 on disk), plus one
    patient without features; genomics and a clinical column for the fusion models."""
    root = tmp_path_factory.mktemp("streaming")
    rng = np.random.default_rng(3)
    ids = [f"P{i}" for i in range(9)]
    slides = []
    for i, pid in enumerate(ids[:8]):
        for s in range(2 if i >= 6 else 1):
            sid = f"{pid}s{s}"
            slides.append((sid, pid))
            n = int(rng.integers(20, 120))
            coords = rng.integers(0, 5000, (n, 2))
            for enc, dim in ENCODERS.items():
                x = (rng.standard_normal((n, dim)) + (i % 2)).astype(np.float16)
                (root / "features" / enc).mkdir(parents=True, exist_ok=True)
                write_features(root / "features" / enc / f"{sid}.h5", x, coords,
                               {"patch_size_level0": 256, "level0_mpp": 0.5})
                if i < 4:  # a low-magnification tile set for the first patients
                    (root / "features" / enc / "low").mkdir(parents=True, exist_ok=True)
                    write_features(root / "features" / enc / "low" / f"{sid}.h5", x[: n // 4], coords[: n // 4],
                                   {"patch_size_level0": 1024, "level0_mpp": 0.5})
    slides.append(("P8s0", "P8"))
    patients = pd.DataFrame({"patient_id": ids, "time": rng.uniform(1, 50, 9).round(1),
                             "event": [1, 0, 1, 1, 0, 1, 1, 0, 1], "age": rng.normal(60, 9, 9)})
    patients.index = patients["patient_id"].to_numpy()
    genomics = pd.DataFrame(rng.standard_normal((9, 8)), index=ids, columns=[f"A_g{j}" for j in range(8)])
    slide_table = pd.DataFrame(slides, columns=["slide_id", "patient_id"]).assign(path="x.tiff")
    cohort = Cohort(root, CohortSpec(clinical={"age": "numeric"}), slide_table, patients, genomics)
    return RunLayout(root), cohort


def _both(run, **kw):
    layout, cohort = run
    in_memory, _ = load_bags(layout, cohort, "morph+other", **kw)
    on_disk, _ = load_bags(layout, cohort, "morph+other", in_memory_bytes=0, **kw)
    return in_memory, on_disk


def test_small_cohorts_stay_in_memory_and_large_ones_on_disk(run):
    in_memory, on_disk = _both(run)
    assert all(isinstance(f, np.ndarray) for f in in_memory.features)
    assert all(isinstance(f, H5Bag) for f in on_disk.features)


def test_a_bag_on_disk_reads_the_same_features_as_in_memory(run):
    in_memory, on_disk = _both(run, keep_without_tiles=True)
    assert on_disk.ids == in_memory.ids and on_disk.dim == in_memory.dim == sum(ENCODERS.values())
    assert on_disk.fingerprint() == in_memory.fingerprint()  # resumed runs do not retrain across the budget
    rng = np.random.default_rng(0)
    for lazy, arr in zip(on_disk.features, in_memory.features, strict=True):
        assert lazy.shape == arr.shape and arr.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(lazy), arr)
        rows = np.sort(rng.choice(len(arr), min(len(arr), 17), replace=False)) if len(arr) else np.zeros(0, int)
        np.testing.assert_array_equal(lazy[rows], arr[rows])  # rows across both slides of P6, P7
        np.testing.assert_array_equal(lazy[rows[::-1]], arr[rows[::-1]])
        np.testing.assert_array_equal(lazy[5:40], arr[5:40])
        if len(arr):
            np.testing.assert_allclose(lazy.mean(0), arr.mean(0), rtol=1e-5, atol=1e-6)
    for max_rows in (100, 10_000):  # a sample of the stacked tiles, and all of them
        for a, b in zip(feature_moments(on_disk.features, max_rows), feature_moments(in_memory.features, max_rows),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    got = batch_inputs(on_disk, [6, 7, 0], torch.device("cpu"), 30, np.random.default_rng(5))
    want = batch_inputs(in_memory, [6, 7, 0], torch.device("cpu"), 30, np.random.default_rng(5))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("model", ["abmil", "biofusion"])
def test_risks_from_bags_on_disk_equal_those_in_memory(run, model):
    in_memory, on_disk = _both(run, keep_without_tiles=model == "biofusion")
    config = TrainConfig(model=model, folds=2, epochs=1, batch_size=4, max_tiles=32, device="cpu", hidden=16)
    prep = Preprocessor().fit(in_memory)
    in_memory.tab = on_disk.tab = prep.transform(in_memory)
    a, _ = fit(in_memory, in_memory, config, seed=1, prep=prep)
    b, _ = fit(on_disk, on_disk, config, seed=1, prep=prep)  # same draws, same rows: the same model
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)
    cpu = torch.device("cpu")
    np.testing.assert_allclose(predict_risk(a, on_disk, cpu), predict_risk(a, in_memory, cpu), rtol=1e-5, atol=1e-6)


class Spy(torch.nn.Module):
    """A model that records the padded shape of every batch and scores a patient by its mean feature."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, int]] = []

    def forward(self, features, mask, **_):
        self.shapes.append(tuple(features.shape[:2]))
        m = mask.float()
        return {"risk": (features[..., 0] * m).sum(1) / m.sum(1).clamp_min(1)}


def test_inference_is_batched_by_tiles(run):
    _, on_disk = _both(run)
    budget = 150
    spy = Spy()
    risks = predict_risk(spy, on_disk, torch.device("cpu"), batch_size=8, max_tiles=budget)
    sizes = [len(f) for f in on_disk.features]
    assert max(sizes) * 2 > budget  # some bags cannot share a batch
    assert len(spy.shapes) > 1
    for b, n in spy.shapes:
        assert b == 1 or b * n <= budget, spy.shapes  # never several bags padded past the budget
    assert sum(b for b, _ in spy.shapes) == len(on_disk)
    want = [np.asarray(f)[:, 0].mean() for f in on_disk.features]  # each patient scored, in order
    np.testing.assert_allclose(risks, want, rtol=1e-5)
    # small bags still go 8 at a time
    assert [s.stop - s.start for s in inference_batches(on_disk, 8, 10**6)] == [8]


def test_chunked_compressed_features_are_read_through_h5py(tmp_path):
    x = np.random.default_rng(0).standard_normal((500, 7)).astype(np.float16)
    plain, packed = tmp_path / "plain.h5", tmp_path / "packed.h5"
    write_features(plain, x, np.zeros((500, 2)), {})
    with h5py.File(packed, "w") as f:
        f.create_dataset("features", data=x, chunks=(64, 7), compression="gzip")
    rows = np.array([0, 3, 64, 65, 499])
    for path in (plain, packed):
        bag = H5Bag([(path,)], [500], 7)
        np.testing.assert_array_equal(bag[rows], x[rows].astype(np.float32))
        np.testing.assert_array_equal(np.asarray(bag), x.astype(np.float32))
    with pytest.raises(IndexError):
        H5Bag([(plain,)], [500], 7)[np.array([500])]


def test_encoders_with_different_tiles_are_refused(run, tmp_path):
    layout, cohort = run
    bad = RunLayout(tmp_path)
    for enc, n in (("morph", 10), ("other", 11)):
        (tmp_path / "features" / enc).mkdir(parents=True)
        write_features(tmp_path / "features" / enc / "P0s0.h5", np.zeros((n, 2), np.float16), np.zeros((n, 2)), {})
    with pytest.raises(ValueError, match="same tiles"):
        load_bags(bad, cohort, "morph+other")


def test_extra_tile_sets_stay_on_disk_too(run):
    in_memory, on_disk = _both(run, extra_tile_sets=("low",))
    assert isinstance(on_disk.scale_features[0][0], H5Bag) and len(on_disk.scale_features[0][5]) == 0
    for lazy, arr in zip(on_disk.scale_features[0], in_memory.scale_features[0], strict=True):
        np.testing.assert_array_equal(np.asarray(lazy), arr)
    assert on_disk.fingerprint() == in_memory.fingerprint()
    got = batch_inputs(on_disk, [0, 5], torch.device("cpu"), 8, np.random.default_rng(1))
    want = batch_inputs(in_memory, [0, 5], torch.device("cpu"), 8, np.random.default_rng(1))
    for a, b in zip(got["scale_features"], want["scale_features"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
