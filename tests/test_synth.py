import cv2
import numpy as np
import openslide
import pandas as pd
from scipy.stats import spearmanr

from fusion.synth import MORPHOLOGIES, SynthConfig, _patients, load_truth


def test_slides_are_pyramidal_tiffs_that_openslide_reads(tiny_cohort):
    slides = pd.read_csv(tiny_cohort / "slides.csv")
    with openslide.OpenSlide(str(tiny_cohort / slides.path[0])) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == 0.5
        assert s.level_count >= 2 and s.level_downsamples[1] == 4.0
        assert s.dimensions == (2048, 1536)
        tile = np.asarray(s.read_region((0, 0), 0, (256, 256)))
        assert tile.shape == (256, 256, 4)


def test_truth_beside_the_cohort(tiny_cohort):
    truth, slides = load_truth(tiny_cohort)
    assert {"true_risk", "z_img", *(f"prop_{m}" for m in MORPHOLOGIES)} <= set(truth.columns)
    sid = next(iter(slides))
    labels = cv2.imread(str(tiny_cohort / "truth" / f"{sid}.labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (1536 // 8, 2048 // 8)
    assert set(np.unique(labels)) <= set(range(len(MORPHOLOGIES) + 3))  # + pen ink, debris
    assert 0.1 < ((labels > 0) & (labels <= 5)).mean() < 0.9  # tissue on glass
    assert (labels == 7).any()  # debris on the glass


def test_outcomes_follow_the_hidden_state():
    rng = np.random.default_rng(0)
    patients, truth, _ = _patients(SynthConfig(patients=3000), rng)
    events = patients.os_event.to_numpy()
    assert 0.2 < events.mean() < 0.5  # events are a minority, as in ER+ cohorts
    # Higher true risk -> shorter time among events; tumour share rises with z_img.
    ev = events == 1
    assert spearmanr(truth.true_risk[ev], patients.os_months[ev])[0] < -0.3
    assert spearmanr(truth.z_img, truth.prop_tumour)[0] > 0.9
    assert spearmanr(truth.z_img, truth.prop_lymphocytes)[0] < -0.9


def test_each_modality_carries_risk_the_others_do_not():
    """Grade is a noisy reading of the tumour, not a copy of the slide's state, and genomics add a
    programme the slide does not show: a reader of all three modalities beats any one of them."""
    from sklearn.linear_model import LinearRegression

    from fusion.survival import concordance

    rng = np.random.default_rng(1)
    patients, truth, _ = _patients(SynthConfig(patients=4000), rng)
    assert 0.3 < np.corrcoef(truth.z_img, patients.grade)[0, 1] < 0.6
    clinical = pd.get_dummies(patients[["grade", "stage"]].astype(str)).to_numpy(float)
    clinical = np.c_[clinical, patients.age]
    views = {"image": truth[["z_img"]].to_numpy(), "genomics": truth[["z_gene"]].to_numpy(), "clinical": clinical}
    views["all"] = np.concatenate(list(views.values()), 1)
    time, event = patients.os_months.to_numpy(), patients.os_event.to_numpy().astype(bool)
    c = {name: concordance(time, event, LinearRegression().fit(x, truth.true_risk).predict(x))
         for name, x in views.items()}
    oracle = concordance(time, event, truth.true_risk.to_numpy())
    assert c["all"] > 0.97 * oracle, c
    assert max(c["image"], c["genomics"], c["clinical"]) < c["all"] - 0.05, c


def test_progress_counts_every_slide(tmp_path):
    """`fusion synth`'s bar: one call per finished slide, ending at the number of slides made."""
    from fusion.synth import synthesize_cohort

    calls = []
    config = SynthConfig(patients=4, seed=2, slide_px=1024, extra_slide_prob=0.5, workers=1)
    out = synthesize_cohort(tmp_path / "c", config, on_slide=lambda done, total: calls.append((done, total)))
    n = len(pd.read_csv(out / "slides.csv"))
    assert n > 4  # some patients have a second slide
    assert calls == [(i, n) for i in range(n + 1)]


def test_parallel_and_serial_synthesis_make_the_same_cohort(tmp_path):
    """Each slide depends on its own seed only: tables, truth and slide bytes are the same whatever the
    number of processes and the order they finish in."""
    from fusion.synth import synthesize_cohort

    calls = []
    made = {}
    for workers in (1, 2):
        config = SynthConfig(patients=5, seed=4, slide_px=1024, extra_slide_prob=0.3, workers=workers)
        out = synthesize_cohort(tmp_path / str(workers), config, on_slide=lambda d, t: calls.append((d, t)))
        made[workers] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert made[1].keys() == made[2].keys()
    assert len([p for p in made[1] if p.suffix == ".tiff"]) == len(pd.read_csv(tmp_path / "1" / "slides.csv"))
    for path in made[1]:
        assert made[1][path] == made[2][path], path
    assert calls[-1][0] == calls[-1][1]  # the parallel run counted every slide too
