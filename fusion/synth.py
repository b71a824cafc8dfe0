"""Synthetic cohort: pyramidal H&E-like slides, gene expression, clinical data, survival outcomes.

The generative story (every patient). Each modality sees part of the risk that the others do not,
so that a model reading all three can beat every single-modality model (the oracle is the ceiling):
  z_img  ~ N(0, 1)   hidden tumour aggressiveness, visible in the slide: more tumour and necrosis,
                     fewer lymphocytes as z_img grows; the IMMUNE gene pathway echoes it weakly;
  z_gene ~ N(0, 1)   a proliferation programme, visible in the PROLIF gene pathway only
                     (corr. 0.2 with z_img), not in the slide;
  clinical           age; grade, a coarse and noisy pathologist's reading of the tumour
                     (1-3 from 0.5 z_img + 0.85 noise: corr. ~0.45 with z_img, as real grade is far
                     from determined by morphology); stage, mostly extent (0.3 z_img + 0.3 z_gene +
                     0.9 noise); ER status (no effect). Grade's reading noise and age carry risk of their
                     own, seen only in the clinical table.
  true risk  eta = 1.0 z_img + 1.0 z_gene + 0.4 (grade - 2) + 0.03 (age - 60)  (default weights)
  survival   T ~ Weibull(shape 1.3, scale exp(-eta / 1.3) * T0); censoring C ~ U(6, 150) months,
             so that events are a minority (~35 %) as in ER+ cohorts.
Linear readers of each modality's hidden states on a large cohort (the slide read with some noise)
reach C-indices of about 0.71 clinical, 0.75 genomics, 0.75 image and 0.83 all three; the true risk 0.84.

Optional signals that a plain attention pool over tiles cannot read (off by default; when off, the
cohort is byte-for-byte what it was before they existed). Each adds a hidden state, drawn from its
own random stream, to the true log-hazard with the given weight:
  context_signal  z_ctx, tumour-infiltrating lymphocytes: the lymphocytes come as aggregates of
                  ~80 um whose total area is the patient's lymphocyte share, placed either close to
                  tumour (centre 100-220 um from it) or far from it (> 500 um), a share sigmoid(2 z_ctx)
                  of them close. Proportions do not change with z_ctx, only who is next to whom;
                  risk -context_signal * z_ctx (infiltrated tumours do better).
  scale_signal    z_arch, tumour architecture at low magnification: tumour nests of the same size
                  and total area either gathered in one part of the tissue (a large-scale field,
                  ~6x the region size, modulates where tumour may win) or spread over all of it
                  (high z_arch). A high-magnification tile looks the same either way; a 1 mm tile
                  does not. Risk +scale_signal * z_arch (dispersed, infiltrative growth does worse).

Slides are tiled, JPEG-compressed, pyramidal TIFFs (4x downsample per level) with resolution tags,
which openslide opens as `generic-tiff` with `openslide.mpp-x`. Level 0 is rendered in stripes and
streamed to the writer, so the size is limited by disk, not memory.

Ground truth lives in `<cohort>/truth/`, never in the tables the models read:
  truth/patients.csv          true risk, hidden states, morphology proportions per patient;
  truth/<slide_id>.labels.png uint8 label map, one pixel per `label_px` level-0 pixels:
                              0 glass, 1..5 MORPHOLOGIES, 6 pen ink, 7 debris;
                              tissue mask = 1 <= labels <= 5;
  truth/slides.json           per slide: label_px, level-0 size, mpp.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile
import yaml

from fusion.cohort import id_problem
from fusion.storage import atomic_path, write_json

MORPHOLOGIES = ("tumour", "stroma", "lymphocytes", "necrosis", "fat")
# How each morphology's share moves with z_img (log-odds per unit), and its share at z_img = 0.
_MORPH_SLOPE = np.array([0.9, 0.0, -0.9, 0.8, -0.3])
_MORPH_BASE = np.log(np.array([0.25, 0.30, 0.20, 0.08, 0.17]))
PATHWAYS = ("PROLIF", "IMMUNE", "ER_SIGNAL", "EMT", "HYPOXIA", "DNA_REPAIR", "MAPK", "WNT")
PEN, DEBRIS = 6, 7  # labels of artefacts that are not tissue
TILE = 256  # TIFF tile size
LABEL_PX = 8  # level-0 pixels per ground-truth label pixel
WEIBULL_SHAPE = 1.3


@dataclass(frozen=True)
class SynthConfig:
    """Size and realism knobs. Defaults give the demo cohort."""

    patients: int = 250
    seed: int = 0
    slide_px: int = 4096  # long side of level 0 in pixels
    mpp: float = 0.5
    genes_per_pathway: int = 16
    extra_slide_prob: float = 0.2  # chance that a patient has a second slide
    missing_genomics: float = 0.0  # fraction of patients without genomics
    missing_slides: float = 0.0  # fraction of patients without any slide
    jpeg_quality: int = 85
    workers: int = 0  # processes rendering slides; 0 = one per core
    region_um: float = 120.0  # correlation length of morphology regions (blobs ~2.5x this)
    pen_prob: float = 0.3  # chance that a slide carries pen marks
    blur_prob: float = 0.0  # chance that a slide has an out-of-focus band (a quarter of its width)
    debris: int = 6  # specks of dust/debris on the glass per slide
    # Weights of the true log-hazard: image state, genomic state, grade, age (per year).
    risk_weights: tuple[float, float, float, float] = (1.0, 1.0, 0.4, 0.03)
    context_signal: float = 0.0  # weight of z_ctx (lymphocytes next to tumour); 0 = off
    scale_signal: float = 0.0  # weight of z_arch (tumour gathered or dispersed, seen at low power); 0 = off
    # Patient ids are <id_prefix><number from id_offset, 4 digits>: new patients to score get ids no
    # training cohort uses (e.g. prefix "N"), since an id names one patient everywhere.
    id_prefix: str = "P"
    id_offset: int = 0

    @property
    def signals(self) -> bool:
        return bool(self.context_signal or self.scale_signal)

    def patient_id(self, i: int) -> str:
        """The id of the i-th patient."""
        return f"{self.id_prefix}{self.id_offset + i:04d}"


_SIGNAL_FIELDS = ("context_signal", "scale_signal")


def synthesize_cohort(out: str | Path, config: SynthConfig = SynthConfig(),
                      on_slide: Callable[[int, int], None] | None = None) -> Path:
    """Write a full synthetic cohort folder (tables, slides, truth) and return its path.

    `on_slide(done, total)` is called in this process as each slide is finished (for a progress bar)."""
    out = Path(out)
    if config.id_offset < 0:
        raise ValueError(f"--id-offset must be >= 0, got {config.id_offset}")
    problem = id_problem(config.patient_id(config.patients - 1))
    if problem:
        raise ValueError(f"--id-prefix '{config.id_prefix}' makes patient ids that cannot be used: {problem}")
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    patients, truth, states = _patients(config, rng)
    genomics = _genomics(config, states, rng)
    slides = _slide_table(config, patients["patient_id"].tolist(), rng)

    jobs = []
    for sid, pid, rel in slides[["slide_id", "patient_id", "path"]].itertuples(index=False):
        row = truth.loc[truth.patient_id == pid].iloc[0]
        props = row[[f"prop_{m}" for m in MORPHOLOGIES]].to_numpy(dtype=float)
        seed = int(rng.integers(2**31))
        signals = {k: float(row[k]) for k in ("z_ctx", "z_arch") if k in row}
        jobs.append((str(out / rel), sid, props, seed, config, signals))
    slide_truth = dict(_render_all(jobs, config.workers, on_slide))

    patients.to_csv(out / "patients.csv", index=False)
    slides.to_csv(out / "slides.csv", index=False)
    genomics.to_csv(out / "genomics.csv", index=False)
    truth.to_csv(out / "truth" / "patients.csv", index=False)
    write_json(out / "truth" / "slides.json", slide_truth)
    # Fields added later only when set: the default cohort's files stay as they were before they existed.
    # `workers` is how fast, not what: the cohort is the same whatever it is, and so is this file.
    recorded = {k: v for k, v in asdict(config).items() if (k not in _SIGNAL_FIELDS or v) and k != "workers"}
    for key, default in (("id_prefix", "P"), ("id_offset", 0)):
        if recorded[key] == default:
            del recorded[key]
    write_json(out / "truth" / "config.json", recorded)
    spec = {
        "name": f"synthetic-{config.seed}",
        "time_unit": "months",
        "tables": {"slides": "slides.csv", "patients": "patients.csv", "genomics": "genomics.csv"},
        "outcome": {"time": "os_months", "event": "os_event"},
        "label": "subtype",
        "clinical": {"age": "numeric", "grade": "categorical", "stage": "categorical",
                     "er_status": "categorical"},
        "genomics": "all",
        "description": f"Synthetic cohort made by `fusion synth` (seed {config.seed}): H&E-like slides, gene "
                       "expression and clinical data with survival drawn from a known hazard (truth/ holds it).",
        "intended_use": {"population": "synthetic patients resembling ER+ breast cancer (a demonstration cohort)",
                         "predicts": "overall survival",
                         "not_for": "any patient: the data are simulated, for demonstration and testing"},
    }
    (out / "cohort.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def _patients(config: SynthConfig, rng: np.random.Generator):
    n = config.patients
    z_img = rng.standard_normal(n)
    z_gene = 0.2 * z_img + np.sqrt(1 - 0.04) * rng.standard_normal(n)
    age = np.clip(rng.normal(60, 10, n), 28, 90).round()
    # Grade is a coarse, noisy reading of the tumour (inter-observer variation, sampling): the noise
    # part is risk that only the clinical table carries, and the slide is not a copy of the grade.
    grade = np.digitize(0.5 * z_img + 0.85 * rng.standard_normal(n), [-0.6, 0.6]) + 1
    stage_score = 0.3 * z_img + 0.3 * z_gene + 0.9 * rng.standard_normal(n)
    stage = np.array(["I", "II", "III"])[np.digitize(stage_score, [-0.5, 0.7])]
    er = np.where(rng.random(n) < 0.8, "positive", "negative")
    w_img, w_gene, w_grade, w_age = config.risk_weights
    eta = w_img * z_img + w_gene * z_gene + w_grade * (grade - 2) + w_age * (age - 60)
    # The optional signals draw from their own stream, so turning them on changes nothing else.
    extra_rng = np.random.default_rng([config.seed, 15])
    z_ctx, z_arch = extra_rng.standard_normal(n), extra_rng.standard_normal(n)
    eta = eta - config.context_signal * z_ctx + config.scale_signal * z_arch

    # Weibull proportional hazards: S(t) = exp(-(t / T0)^k * exp(eta)).
    t0 = 180.0  # scale chosen so that ~35 % of patients have an observed event
    u = rng.random(n)
    t_event = t0 * (-np.log(u) * np.exp(-eta)) ** (1 / WEIBULL_SHAPE)
    t_censor = rng.uniform(6.0, 150.0, n)
    time = np.minimum(t_event, t_censor).round(2)
    event = (t_event <= t_censor).astype(int)
    label = (0.8 * z_img + 0.8 * z_gene + 0.5 * rng.standard_normal(n) > 0).astype(int)

    logits = _MORPH_BASE[None, :] + _MORPH_SLOPE[None, :] * z_img[:, None]
    props = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    ids = [config.patient_id(i) for i in range(n)]
    patients = pd.DataFrame({
        "patient_id": ids, "os_months": time, "os_event": event,
        "subtype": np.where(label == 1, "luminal_b", "luminal_a"),
        "age": age.astype(int), "grade": grade, "stage": stage, "er_status": er,
    })
    truth = pd.DataFrame({"patient_id": ids, "true_risk": eta, "z_img": z_img, "z_gene": z_gene,
                          "label": label})
    if config.context_signal:
        truth["z_ctx"] = z_ctx
    if config.scale_signal:
        truth["z_arch"] = z_arch
    for k, m in enumerate(MORPHOLOGIES):
        truth[f"prop_{m}"] = props[:, k]
    return patients, truth, {"z_img": z_img, "z_gene": z_gene, "ids": ids}


def _genomics(config: SynthConfig, states: dict, rng: np.random.Generator) -> pd.DataFrame:
    """Log-expression with pathway structure: each pathway is one latent factor plus noise."""
    n = len(states["ids"])
    factors = rng.standard_normal((n, len(PATHWAYS)))
    factors[:, 0] = states["z_gene"]  # PROLIF carries the genomic risk
    factors[:, 1] = -0.4 * states["z_img"] + 0.9 * factors[:, 1]  # IMMUNE echoes lymphocytes, weakly
    cols, values = [], []
    for p, name in enumerate(PATHWAYS):
        for j in range(config.genes_per_pathway):
            loading = rng.uniform(0.5, 1.0) * rng.choice([-1, 1])
            base = rng.uniform(4, 10)
            values.append(base + loading * factors[:, p] + 0.6 * rng.standard_normal(n))
            cols.append(f"{name}_{j + 1:02d}")
    df = pd.DataFrame(np.round(np.stack(values, 1), 3), columns=cols)
    df.insert(0, "patient_id", states["ids"])
    keep = rng.random(n) >= config.missing_genomics
    return df[keep].reset_index(drop=True)


def _slide_table(config: SynthConfig, ids: list[str], rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for pid in ids:
        if rng.random() < config.missing_slides:
            continue
        n_slides = 1 + int(rng.random() < config.extra_slide_prob)
        for s in range(n_slides):
            sid = f"{pid}-S{s + 1}"
            rows.append({"slide_id": sid, "patient_id": pid, "path": f"slides/{sid}.tiff"})
    return pd.DataFrame(rows, columns=["slide_id", "patient_id", "path"])


def available_cores() -> int:
    """CPU cores this process may run on (the container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _render_all(jobs: list, workers: int, on_slide: Callable[[int, int], None] | None):
    """(slide id, truth info) of every job, rendered by `workers` processes (0: one per core); each
    slide depends on its own seed only, so the result is the same whatever the workers and their order."""
    workers = min(workers or available_cores(), len(jobs))
    total, done = len(jobs), 0
    if on_slide:
        on_slide(0, total)
    if workers <= 1:
        for job in jobs:
            yield _render_job(job)
            done += 1
            if on_slide:
                on_slide(done, total)
        return
    # One thread of OpenCV per process: the processes already fill the cores. Forkserver, not fork: a fork
    # of a process that runs threads (torch's, a test session's, Prefect's) can inherit a held lock and hang
    # (seen: both workers idle on an empty call queue while the pool waited for them).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                             initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        for future in as_completed([pool.submit(_render_job, job) for job in jobs]):
            yield future.result()
            done += 1
            if on_slide:
                on_slide(done, total)


def _render_job(job) -> tuple[str, dict]:
    path, sid, props, seed, config, signals = job
    labels, ink, blur_band = render_slide(path, props, seed, config, signals)
    truth_dir = Path(path).parent.parent / "truth"
    ok, png = cv2.imencode(".png", labels)
    with atomic_path(truth_dir / f"{sid}.labels.png") as tmp:
        tmp.write_bytes(png.tobytes())
    h, w = _slide_shape(config.slide_px)
    return sid, {"label_px": LABEL_PX, "width": w, "height": h, "mpp": config.mpp, "ink": ink,
                 "out_of_focus_x": blur_band,
                 "labels": {"0": "glass", **{str(k + 1): m for k, m in enumerate(MORPHOLOGIES)},
                            str(PEN): "pen", str(DEBRIS): "debris"}}


def _slide_shape(slide_px: int) -> tuple[int, int]:
    w = int(slide_px)
    h = int(round(slide_px * 0.75))
    return h, w


# ---------------------------------------------------------------- slide rendering


def morphology_map(shape: tuple[int, int], props: np.ndarray, rng: np.random.Generator,
                   region_px: float = 60.0, gather: float | None = None, without: int | None = None) -> np.ndarray:
    """Label map [h, w] uint8: 0 glass, k+1 = MORPHOLOGIES[k]; regions are smooth blobs whose
    correlation length is `region_px` label pixels (a physical size, whatever the slide's size).

    `gather` (scale signal): how strongly a large-scale field confines tumour to part of the tissue
    (0 = spread evenly); the tumour's share of the tissue is kept. `without`: a morphology index
    left out of the map (its area goes to the others), to be placed afterwards (context signal).
    Both draw their random numbers after the default ones, so the rest of the slide is unchanged."""
    h, w = shape
    # Tissue: one or two smooth islands inside an elliptical envelope.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w), np.float32)
    n_islands = 1 + int(rng.random() < 0.5)
    for i in range(n_islands):
        cx = w * (0.5 if n_islands == 1 else (0.3 + 0.4 * i)) + rng.normal(0, 0.03 * w)
        cy = h * 0.5 + rng.normal(0, 0.05 * h)
        rx = w * (0.3 if n_islands == 1 else 0.16) * rng.uniform(0.85, 1.1)
        ry = h * 0.32 * rng.uniform(0.8, 1.1)
        field = np.maximum(field, 1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2)
    field += 0.3 * _smooth_noise((h, w), max(h, w) / 12, rng)
    # Keep a margin of glass at the border, as a scanner's tissue finder does.
    edge = np.minimum(np.minimum(xx, w - 1 - xx) / w, np.minimum(yy, h - 1 - yy) / h)
    tissue = (field > 0.15) & (edge > 0.03)

    # Morphology regions: argmax of smooth random fields plus log-proportions.
    scores = np.stack([_smooth_noise((h, w), region_px, rng) for _ in props])
    scores = 1.6 * scores + np.log(np.maximum(props, 1e-4))[:, None, None]
    if without is not None:
        scores[without] = -np.inf
    if gather is not None:
        share = (scores.argmax(0) == 0)[tissue].mean()  # the tumour's share, kept while gathering it
        large = _smooth_noise((h, w), 6 * region_px, rng)
        scores[0] += gather * large + _offset_for_share(scores, gather * large, share, tissue)
    labels = (scores.argmax(0) + 1).astype(np.uint8)
    labels[~tissue] = 0
    return labels


def _offset_for_share(scores: np.ndarray, extra: np.ndarray, share: float, tissue: np.ndarray) -> float:
    """The constant c for which class 0, with `extra + c` added to its score, wins `share` of the tissue."""
    others = scores[1:].max(0)[tissue]
    base = (scores[0] + extra)[tissue]
    lo, hi = -10.0, 10.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (base + mid > others).mean() < share else (lo, mid)
    return (lo + hi) / 2


def place_lymphocytes(labels: np.ndarray, share: float, near_fraction: float, rng: np.random.Generator,
                      label_um: float) -> None:
    """Context signal: lymphocyte aggregates (discs of ~80 um) covering `share` of the tissue, a
    `near_fraction` of them with their centre 100-220 um from tumour, the rest > 500 um from it
    (or as far as the tissue allows); drawn over non-tumour tissue, in place."""
    tissue = (labels >= 1) & (labels <= 5)
    tumour = labels == 1
    dist = cv2.distanceTransform((~tumour).astype(np.uint8), cv2.DIST_L2, 5) * label_um if tumour.any() \
        else np.full(labels.shape, np.inf, np.float32)
    free = tissue & ~tumour
    near = np.argwhere(free & (dist >= 100) & (dist <= 220))
    far_cut = min(500.0, float(np.quantile(dist[free], 0.8))) if free.any() and np.isfinite(dist[free]).all() \
        else 500.0
    far = np.argwhere(free & (dist >= far_cut))
    radius = max(1, int(round(40 / label_um)))
    target = share * tissue.sum()
    lymph = MORPHOLOGIES.index("lymphocytes") + 1
    disc = np.zeros(labels.shape, np.uint8)
    covered, tries = 0, 0
    # Aggregates until their area is the lymphocyte share, whatever their overlaps or the tissue edge.
    while covered < target and tries < 10_000 and (len(near) or len(far)):
        tries += 1
        pool = near if (rng.random() < near_fraction and len(near)) or not len(far) else far
        y, x = pool[rng.integers(len(pool))]
        cv2.circle(disc, (int(x), int(y)), radius, 1, -1)
        if tries % 8 == 0 or covered + np.pi * radius**2 >= target:
            covered = int(((disc > 0) & free).sum())
    labels[(disc > 0) & free] = lymph


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length `sigma` pixels."""
    h, w = shape
    f = max(1, int(sigma // 4))  # blur at a coarser grid, then upsample: same field, far cheaper
    small = rng.standard_normal((max(2, h // f + 1), max(2, w // f + 1))).astype(np.float32)
    small = cv2.GaussianBlur(small, (0, 0), sigma / f)
    small /= small.std() + 1e-6
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def render_slide(path: str | Path, props: np.ndarray, seed: int, config: SynthConfig,
                 signals: dict[str, float] | None = None):
    """Render one slide to `path` (pyramidal tiled JPEG TIFF); return (label map, ink or None,
    out-of-focus band (x0, x1) in level-0 pixels or None). `signals`: the patient's z_ctx / z_arch
    when the cohort has the context / scale signals."""
    rng = np.random.default_rng(seed)
    signals = signals or {}
    h, w = _slide_shape(config.slide_px)
    mpp, quality = config.mpp, config.jpeg_quality
    label_um = mpp * LABEL_PX
    lymph = MORPHOLOGIES.index("lymphocytes")
    gather = float(np.clip(1.5 - 0.75 * signals["z_arch"], 0.0, 3.0)) if "z_arch" in signals else None
    labels = morphology_map((-(-h // LABEL_PX), -(-w // LABEL_PX)), props, rng,
                            region_px=config.region_um / label_um, gather=gather,
                            without=lymph if "z_ctx" in signals else None)
    if "z_ctx" in signals:
        place_lymphocytes(labels, float(props[lymph]), float(1 / (1 + np.exp(-2 * signals["z_ctx"]))), rng, label_um)
    ink = add_artefacts(labels, rng, label_um, config.pen_prob, config.debris)
    textures = make_textures(mpp, ink or "blue")
    blur_band = None
    if rng.random() < config.blur_prob:  # a scanner focus failure: one band of the slide is soft
        x0 = int(rng.uniform(0.2, 0.55) * w)
        blur_band = (x0, x0 + w // 4)
    lower: list[np.ndarray] = []  # level-1 stripes, filled while level 0 streams out

    def level0_tiles():
        for y0 in range(0, h, TILE):
            stripe = _render_stripe(labels, y0, min(TILE, h - y0), w, rng, textures)
            if blur_band:
                b0, b1 = blur_band
                stripe[:, b0:b1] = cv2.GaussianBlur(stripe[:, b0:b1], (0, 0), 3.0 / mpp)
            lower.append(cv2.resize(stripe, (-(-w // 4), -(-stripe.shape[0] // 4)),
                                    interpolation=cv2.INTER_AREA))
            padded = np.full((TILE, -(-w // TILE) * TILE, 3), 255, np.uint8)
            padded[: stripe.shape[0], :w] = stripe
            for x0 in range(0, padded.shape[1], TILE):
                yield padded[:, x0 : x0 + TILE]

    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=h * w > 2**31) as tw:
        opts = dict(tile=(TILE, TILE), compression="jpeg", compressionargs={"level": quality},
                    photometric="rgb", resolutionunit="CENTIMETER", metadata=None)
        tw.write(level0_tiles(), shape=(h, w, 3), dtype=np.uint8, subfiletype=0,
                 resolution=(1e4 / mpp, 1e4 / mpp), **opts)
        level = np.concatenate(lower, 0)[: -(-h // 4)]
        downsample = 4
        while True:
            tw.write(level, subfiletype=1, resolution=(1e4 / (mpp * downsample),) * 2, **opts)
            if max(level.shape[:2]) <= 1024:
                break
            level = cv2.resize(level, (-(-level.shape[1] // 4), -(-level.shape[0] // 4)),
                               interpolation=cv2.INTER_AREA)
            downsample *= 4
    return labels, ink, blur_band


def add_artefacts(labels: np.ndarray, rng: np.random.Generator, label_um: float, pen_prob: float,
                  debris: int) -> str | None:
    """Draw pen ink and glass debris into `labels` (in place); return the ink colour used.

    Pen strokes are arcs around the tissue, as a pathologist circles a region; where they cross
    tissue, the ink hides it (truth: not tissue). Debris are specks of 20-80 um on the glass,
    smaller than any tissue piece a tiler should keep.
    """
    h, w = labels.shape
    ink = None
    if rng.random() < pen_prob:
        ink = str(rng.choice(list(INKS)))
        for _ in range(int(rng.integers(1, 3))):
            centre = (int(w * rng.uniform(0.45, 0.55)), int(h * rng.uniform(0.45, 0.55)))
            axes = (int(w * rng.uniform(0.40, 0.46)), int(h * rng.uniform(0.38, 0.44)))
            start = rng.uniform(0, 360)
            thickness = max(1, int(rng.uniform(100, 200) / label_um))
            cv2.ellipse(labels, centre, axes, 0, start, start + rng.uniform(60, 160), PEN, thickness)
    # Debris lies on open glass, at least 150 um from tissue and ink.
    far = cv2.distanceTransform((labels == 0).astype(np.uint8), cv2.DIST_L2, 5) * label_um > 150
    glass = np.argwhere(far)
    for y, x in glass[rng.choice(len(glass), min(debris, len(glass)), replace=False)] if len(glass) else []:
        cv2.circle(labels, (int(x), int(y)), max(1, int(rng.uniform(10, 40) / label_um)), DEBRIS, -1)
    return ink


# Colours (RGB) of H&E: haematoxylin-dark nuclei, eosin-pink cytoplasm and stroma.
_BASE = {
    1: (222, 158, 200),  # tumour: purple-pink cytoplasm
    2: (238, 170, 196),  # stroma: eosin pink
    3: (226, 196, 222),  # lymphocytes: pale background between nuclei
    4: (214, 182, 196),  # necrosis: pale, washed-out
    5: (247, 240, 245),  # fat: empty adipocytes
}
GLASS = (243, 241, 244)
INKS = {"blue": (45, 70, 165), "green": (40, 125, 80), "black": (38, 36, 42)}


def _render_stripe(labels: np.ndarray, y0: int, sh: int, w: int, rng: np.random.Generator,
                   textures: dict) -> np.ndarray:
    """RGB uint8 [sh, w, 3] for rows y0..y0+sh of level 0.

    Each class's random fields are drawn over its bounding columns (so the random streams, and the
    pixels, are what they always were), but colours are mixed only at the pixels of that class."""
    ly0, ly1 = y0 // LABEL_PX, -(-(y0 + sh) // LABEL_PX)
    lab = labels[ly0:ly1]
    present = np.flatnonzero(np.bincount(lab.ravel(), minlength=DEBRIS + 1))
    lab = np.repeat(np.repeat(lab, LABEL_PX, 0), LABEL_PX, 1)
    off = y0 - ly0 * LABEL_PX
    lab = lab[off : off + sh, :w]
    # Channel-planar [3, sh, w]: every colour operation runs on contiguous planes, not pixels of 3.
    img = np.empty((3, sh, w), np.float32)
    for k, value in enumerate(GLASS):
        img[k] = value
    planes = img.reshape(3, -1)
    for cls in present:
        if cls == 0:
            continue
        mask = lab == cls
        cols = np.flatnonzero(mask.any(0))
        x0, x1 = cols[0], cols[-1] + 1  # render only the columns where this class is
        at = np.flatnonzero(mask[:, x0:x1])  # flat positions within the class's columns
        pos = at + (at // (x1 - x0)) * (w - (x1 - x0)) + x0  # the same pixels in the stripe
        for plane, values in zip(planes, textures[int(cls)]((sh, x1 - x0), rng, at), strict=True):
            plane[pos] = values
    img += 3.0 * rng.standard_normal((sh, w), dtype=np.float32)
    return cv2.merge(list(np.clip(img, 0, 255, out=img).astype(np.uint8)))


def _nuclei(shape, density, radius, rng, elongate=1.0) -> np.ndarray:
    """Soft mask [h, w] in 0..1 of roughly round nuclei centred on random points."""
    pts = (rng.random(shape, dtype=np.float32) < density).astype(np.uint8)
    r = max(1, int(round(radius)))
    kx, ky = int(round(r * elongate)), r
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * kx + 1, 2 * ky + 1))
    mask = cv2.dilate(pts, kernel).astype(np.float32)
    return cv2.GaussianBlur(mask, (0, 0), 0.8)


def _at(field: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The values of a [h, w] field at flat positions `at`."""
    return field.reshape(-1)[at]


def _paint(img: np.ndarray, alpha: np.ndarray, color, strength=1.0) -> np.ndarray:
    """Mix `color` into colours img [3, n] by alpha [n], in place."""
    a = alpha * strength
    keep = 1 - a
    for k, c in enumerate(np.asarray(color, np.float32)):
        img[k] *= keep
        img[k] += c * a
    return img


def _base(shape, color, rng, at, mottle=8.0, scale=1.0) -> np.ndarray:
    """Colours [3, n] at `at`: `color` mottled by a smooth field drawn over `shape`."""
    mottled = mottle * _at(_smooth_noise(shape, 12 * scale, rng), at)
    img = np.empty((3, len(at)), np.float32)
    for k, c in enumerate(np.asarray(color, np.float32)):
        np.add(c, mottled, out=img[k])
    return img


def make_textures(mpp: float, ink: str = "blue") -> dict:
    """Texture painters per label, sized in microns: `s` is pixels per 0.5 um, so a 40x
    (0.25 um/px) slide shows the same cells twice as large in pixels as a 20x one.

    A painter (shape, rng, at) draws its random fields over `shape` and returns the colours [3, n]
    float32 at the flat positions `at` only (mixing colours is the costly part, and is pointwise)."""
    s = 0.5 / mpp

    def tumour(shape, rng, at):
        img = _base(shape, _BASE[1], rng, at, scale=s)
        img = _paint(img, _at(_nuclei(shape, 1 / (260 * s * s), 6 * s, rng), at), (92, 46, 138), 0.9)
        return _paint(img, _at(_nuclei(shape, 1 / (900 * s * s), 8 * s, rng), at), (70, 34, 120), 0.9)

    def stroma(shape, rng, at):
        img = _base(shape, _BASE[2], rng, at, 4.0, scale=s)
        noise = rng.standard_normal(shape, dtype=np.float32)
        # float64 as it always was (sqrt(s) is a float64 scalar), but only at the class's pixels.
        fibres = _at(cv2.GaussianBlur(noise, (0, 0), sigmaX=9 * s, sigmaY=1.2 * s), at) * np.sqrt(s)
        fibres = 90 * fibres
        for k, c in enumerate(np.array([0.2, 0.6, 0.4], np.float32)):
            img[k] += fibres * c
        nuclei = _nuclei(shape, 1 / (2500 * s * s), 3 * s, rng, elongate=2.5)
        return _paint(img, _at(nuclei, at), (105, 55, 145), 0.8)

    def lymphocytes(shape, rng, at):
        img = _base(shape, _BASE[3], rng, at, scale=s)
        return _paint(img, _at(_nuclei(shape, 1 / (70 * s * s), 3 * s, rng), at), (48, 28, 105), 0.95)

    def necrosis(shape, rng, at):
        img = _base(shape, _BASE[4], rng, at, 14.0, scale=s)
        return _paint(img, _at(_nuclei(shape, 1 / (180 * s * s), 1 * s, rng), at), (125, 70, 135), 0.7)

    def fat(shape, rng, at):
        # Adipocytes 50-100 um across: empty cells behind thin eosin membranes.
        img = _base(shape, _BASE[5], rng, at, 2.0, scale=s)
        h, w = shape
        membranes = np.zeros(shape, np.uint8)
        n = max(1, int(h * w / (3500 * s * s)))
        xs, ys = rng.integers(0, w, n), rng.integers(0, h, n)
        rs = rng.integers(int(50 * s), int(100 * s), n)
        thickness = max(1, int(round(4 * s)))
        for x, y, r in zip(xs, ys, rs, strict=True):
            cv2.circle(membranes, (int(x), int(y)), int(r), 1, thickness)
        soft = cv2.GaussianBlur(membranes.astype(np.float32), (0, 0), 0.8 * s)
        return _paint(img, _at(soft, at), (212, 128, 172))

    def pen(shape, rng, at):
        return _base(shape, INKS[ink], rng, at, 10.0, scale=4 * s)

    def debris(shape, rng, at):
        return _base(shape, (150, 135, 125), rng, at, 12.0, scale=s)

    return {1: tumour, 2: stroma, 3: lymphocytes, 4: necrosis, 5: fat, PEN: pen, DEBRIS: debris}


def load_truth(cohort: str | Path) -> tuple[pd.DataFrame, dict]:
    """Ground truth of a synthetic cohort: (patients table, per-slide info)."""
    cohort = Path(cohort)
    patients = pd.read_csv(cohort / "truth" / "patients.csv", dtype={"patient_id": str})
    slides = json.loads((cohort / "truth" / "slides.json").read_text())
    return patients, slides
