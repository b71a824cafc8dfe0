"""Patient bags: all tiles of all slides of a patient, with the patient's genomics and clinical
data, batched with padding and masks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusion.cohort import Cohort
from fusion.features.extract import read_feature_info
from fusion.run import RunLayout
from fusion.train.tiles import H5Bag, as_array


@dataclass
class Bags:
    """Tile features per patient, with outcomes (and raw tabular data) aligned to `ids`."""

    ids: list[str]
    # each [N_i, D] float32 (N_i = 0 for a patient without slides): an array, or an `H5Bag` left on disk
    features: list[np.ndarray | H5Bag]
    time: np.ndarray  # [P]
    event: np.ndarray  # [P] bool
    genomics: np.ndarray | None = None  # [P, G] raw values; rows of NaN where a patient has none
    gene_names: list[str] = field(default_factory=list)
    clinical: pd.DataFrame | None = None  # [P, C] raw clinical columns
    clinical_types: dict[str, str] = field(default_factory=dict)
    tab: dict[str, np.ndarray] = field(default_factory=dict)  # preprocessed, per patient (see Preprocessor)
    label: np.ndarray | None = None  # [P] class index (classification), -1 where unknown
    classes: list[str] = field(default_factory=list)
    time_unit: str = "months"  # the cohort's time unit (horizons are round numbers in it)
    coords: list[np.ndarray] = field(default_factory=list)  # each [N_i, 2] tile centres in um (see load_bags)
    encoder_dims: list[int] = field(default_factory=list)  # width of each encoder's part of a feature row
    # Extra tile sets (other magnifications of the same slides): per set, per patient [M_i, D'] and [M_i, 2].
    scale_features: list[list[np.ndarray]] = field(default_factory=list)
    scale_coords: list[list[np.ndarray]] = field(default_factory=list)

    def subset(self, idx: np.ndarray) -> Bags:
        idx = np.asarray(idx, dtype=int)
        pick = lambda items: [items[i] for i in idx] if items else items  # noqa: E731
        return dataclasses.replace(
            self, ids=pick(self.ids), features=pick(self.features), time=self.time[idx], event=self.event[idx],
            genomics=None if self.genomics is None else self.genomics[idx],
            clinical=None if self.clinical is None else self.clinical.iloc[idx].reset_index(drop=True),
            tab={k: v[idx] for k, v in self.tab.items()}, label=None if self.label is None else self.label[idx],
            coords=pick(self.coords), scale_features=[pick(s) for s in self.scale_features],
            scale_coords=[pick(s) for s in self.scale_coords])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(next(f.shape[1] for f in self.features if f.ndim == 2))

    @property
    def has_tiles(self) -> np.ndarray:
        return np.array([len(f) > 0 for f in self.features])

    def fingerprint(self) -> str:
        """Content hash of everything training reads: ids, outcomes, labels, every tile feature and
        the raw genomics and clinical tables. Two Bags with the same fingerprint train identically."""
        h = hashlib.sha256()
        for part in (self.ids, self.gene_names, self.classes, self.clinical_types):
            h.update(json.dumps(part, sort_keys=True).encode())
        # Tile positions are not hashed: they come from the same tile files as the features.
        scale_parts = [f for per_set in self.scale_features for f in per_set]
        for arr in (self.time, self.event, self.label, self.genomics, *self.features, *scale_parts):
            if isinstance(arr, H5Bag):  # the same bytes as its array, read a block at a time
                h.update(f"{arr.dtype}{arr.shape}".encode())
                for block in arr.blocks():
                    h.update(np.ascontiguousarray(block).tobytes())
            elif arr is not None:
                a = np.ascontiguousarray(arr)
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(a.tobytes())
        if self.clinical is not None:
            h.update(self.clinical.to_csv(index=False).encode())
        return h.hexdigest()[:16]


SLIDE_GAP_UM = 1e6  # a patient's slides are laid side by side this far apart: never neighbours
# Cohorts whose tile features take more than this (float32) stay on disk as `H5Bag`s; smaller ones are
# read into memory once, as they always were. Override with FUSION_BAGS_IN_MEMORY_MB or `in_memory_bytes`.
IN_MEMORY_BYTES = 1 << 30


def in_memory_budget() -> int:
    """Bytes of tile features `load_bags` holds in memory (FUSION_BAGS_IN_MEMORY_MB, default 1024)."""
    value = os.environ.get("FUSION_BAGS_IN_MEMORY_MB")
    if value is None:
        return IN_MEMORY_BYTES
    try:
        return int(float(value) * 2**20)
    except ValueError:
        raise ValueError(f"FUSION_BAGS_IN_MEMORY_MB={value!r}: a number of megabytes, e.g. 1024") from None


def _slide_tiles(layout: RunLayout, encoders: list[str], slide_id: str, tile_set: str
                 ) -> tuple[tuple[Path, ...], int, np.ndarray, list[int]] | None:
    """(each encoder's features file, number of tiles, tile centres [N, 2] in um, encoder dims) of one
    slide, or None when an encoder has not featurised it. Features are not read here (see `H5Bag`).
    Files without `level0_mpp` (imported) are taken to be 0.5 um/px."""
    paths, centres, dims, n = [], None, [], None
    for enc in encoders:
        path = layout.features_h5(enc, slide_id, tile_set)
        if not path.exists():
            return None
        shape, coords, attrs = read_feature_info(path)
        if n is not None and shape[0] != n:
            raise ValueError(f"{path} holds {shape[0]} tiles but {paths[0]} holds {n}: the encoders of "
                             f"'{'+'.join(encoders)}' must featurise the same tiles; extract them again")
        n = shape[0]
        paths.append(path)
        dims.append(shape[1])
        if centres is None:
            half = float(attrs.get("patch_size_level0", 0)) / 2
            centres = (np.asarray(coords, np.float64) + half) * float(attrs.get("level0_mpp", 0.5))
    return tuple(paths), int(n), centres.astype(np.float32), dims


def _patient_tiles(layout: RunLayout, cohort: Cohort, pid: str, encoders: list[str], tile_set: str
                   ) -> tuple[H5Bag, np.ndarray, list[int]] | None:
    """All featurised tiles of a patient's slides (features left on disk, centres in um with slides set
    apart, dims)."""
    files, lengths, centres, dims = [], [], [], None
    for s, sid in enumerate(cohort.slides_of(pid)["slide_id"]):
        got = _slide_tiles(layout, encoders, sid, tile_set)
        if got is not None and got[1]:
            files.append(got[0])
            lengths.append(got[1])
            centres.append(got[2] + np.array([s * SLIDE_GAP_UM, 0.0], np.float32))
            dims = got[3]
    if not files:
        return None
    return H5Bag(files, lengths, sum(dims)), np.concatenate(centres, 0), dims


def load_bags(layout: RunLayout, cohort: Cohort, encoder: str, tile_set: str = "",
              keep_without_tiles: bool = False, extra_tile_sets: tuple[str, ...] | list[str] = (),
              in_memory_bytes: int | None = None) -> tuple[Bags, list[str]]:
    """Bags of the cohort's patients and the ids without any featurised tile.

    Patients without tiles are left out unless `keep_without_tiles` (fusion models score them from
    their other modalities). Several encoders joined by '+' ("morph+mocov3") give, per tile,
    the concatenation of each encoder's features (same tiles, same order); `Bags.encoder_dims` says
    where each encoder's part starts. Each tile's centre is kept in micrometres (`Bags.coords`), a
    patient's second slide placed `SLIDE_GAP_UM` to the right of the first. `extra_tile_sets` (other
    tilings of the same slides, e.g. a low magnification) are read with the same encoders into
    `Bags.scale_features` / `Bags.scale_coords`; a patient may have none of them.

    Tile features are read into float32 arrays when all of them take at most `in_memory_bytes`
    (default `in_memory_budget()`, 1 GiB); a larger cohort's stay on disk as `H5Bag`s, read a batch at
    a time, so that memory does not grow with the number of patients.
    """
    encoders = encoder.split("+")
    ids, feats, coords, missing = [], [], [], []
    dim, enc_dims = None, []
    for pid in cohort.patients["patient_id"]:
        got = _patient_tiles(layout, cohort, pid, encoders, tile_set)
        if got is not None:
            ids.append(pid)
            feats.append(got[0])
            coords.append(got[1])
            dim, enc_dims = got[0].shape[1], got[2]
        else:
            missing.append(pid)
            if keep_without_tiles:
                ids.append(pid)
                feats.append(None)
                coords.append(np.zeros((0, 2), np.float32))
    feats = [np.zeros((0, dim or 1), np.float32) if f is None else f for f in feats]
    scale_features, scale_coords = [], []
    for extra in extra_tile_sets:
        per = [_patient_tiles(layout, cohort, pid, encoders, extra) for pid in ids]
        extra_dim = next((p[0].shape[1] for p in per if p is not None), dim or 1)
        scale_features.append([np.zeros((0, extra_dim), np.float32) if p is None else p[0] for p in per])
        scale_coords.append([np.zeros((0, 2), np.float32) if p is None else p[1] for p in per])
    budget = in_memory_budget() if in_memory_bytes is None else in_memory_bytes
    total = sum(f.nbytes for f in [*feats, *(f for s in scale_features for f in s)])
    if total <= budget:  # a small cohort: read once, as arrays (no file access per batch)
        feats = [as_array(f) for f in feats]
        scale_features = [[as_array(f) for f in s] for s in scale_features]
    pts = cohort.patients.loc[ids]
    genomics, genes = None, []
    if cohort.genomics is not None:
        genes = list(cohort.genomics.columns)
        genomics = cohort.genomics.reindex(ids).to_numpy(dtype=float)
    clinical = pts[list(cohort.spec.clinical)].reset_index(drop=True) if cohort.spec.clinical else None
    label, classes = None, []
    if cohort.spec.label:
        values = pts[cohort.spec.label]
        classes = sorted_levels(cohort.patients[cohort.spec.label].dropna().astype(str).unique().tolist())
        label = np.array([classes.index(str(v)) if pd.notna(v) else -1 for v in values], dtype=int)
    bags = Bags(ids, feats, pts[cohort.spec.outcome.time].to_numpy(float),
                pts[cohort.spec.outcome.event].to_numpy().astype(bool), genomics, genes, clinical,
                dict(cohort.spec.clinical), label=label, classes=classes, time_unit=cohort.spec.time_unit,
                coords=coords, encoder_dims=enc_dims, scale_features=scale_features, scale_coords=scale_coords)
    return bags, missing


def canonical_level(value) -> str | None:
    """One spelling per category level: "1", "1.0", 1 and " 1 " are "1"; "Positive " is "positive".
    Missing values (None, NaN, blank) are None."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    text = str(value).strip()
    if not text or text.lower() in ("nan", "none", "na", "<na>"):
        return None
    try:
        number = float(text)
    except ValueError:
        return text.casefold()
    if np.isfinite(number) and number == int(number):
        return str(int(number))
    return f"{number:g}"


def sorted_levels(levels) -> list[str]:
    """Category levels in their natural order: numbers as numbers ("2" before "10"), else text."""
    levels = sorted(set(levels))
    try:
        return sorted(levels, key=float)
    except ValueError:
        return levels


@dataclass
class Preprocessor:
    """Genomics and clinical preprocessing fitted on a training fold only, applied to anyone.

    Genomics: the `max_genes` most variable genes of the training fold, z-scored with its means and
    standard deviations; a patient without genomics gets zeros and `genomics_mask = False`.
    Clinical: numeric columns z-scored (missing -> the training mean, i.e. 0); categorical columns
    one-hot over the training fold's levels, spelled canonically (`canonical_level`). A missing value,
    or a level the training fold never had, is encoded as the training fold's mix of levels (each
    column its share: the expectation of the one-hot code), never as "no level at all" (zeros);
    `unseen_levels` lists such values so that a report can say so.
    """

    max_genes: int = 256
    genes: list[str] = field(default_factory=list)
    gene_mean: list[float] = field(default_factory=list)
    gene_std: list[float] = field(default_factory=list)
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)
    # Share of the training fold in each category: the mean of the one-hot columns, i.e. the
    # "average patient" that attributions (integrated gradients) start from.
    category_freq: dict[str, list[float]] = field(default_factory=dict)

    def fit(self, bags: Bags) -> Preprocessor:
        if bags.genomics is not None:
            present = ~np.isnan(bags.genomics).all(1)
            g = bags.genomics[present]
            var = np.nanvar(g, 0)
            order = np.argsort(-var, kind="stable")[: self.max_genes]
            order = np.sort(order)  # keep the table's gene order (groups stay contiguous)
            self.genes = [bags.gene_names[i] for i in order]
            self.gene_mean = np.nanmean(g[:, order], 0).tolist()
            self.gene_std = np.maximum(np.nanstd(g[:, order], 0), 1e-6).tolist()
        if bags.clinical is not None:
            for col, kind in bags.clinical_types.items():
                values = bags.clinical[col]
                if kind == "numeric":
                    v = pd.to_numeric(values, errors="coerce")
                    self.numeric[col] = (float(v.mean()), float(max(v.std(), 1e-6)))
                else:
                    levels = [canonical_level(v) for v in values]
                    known = [v for v in levels if v is not None]
                    self.categories[col] = sorted_levels(known)
                    self.category_freq[col] = [known.count(c) / max(1, len(known)) for c in self.categories[col]]
        return self

    @property
    def groups(self) -> list[list[int]]:
        """Gene groups by the prefix of their names (`PATHWAY_gene`), else chunks of 16. Prefixes that
        name one gene each on average (microarray probe ids such as `X200726_at`) are not groups."""
        prefixes = [g.rsplit("_", 1)[0] if "_" in g else "" for g in self.genes]
        if 1 < len(set(prefixes)) <= len(self.genes) // 2 and all(prefixes):
            names = list(dict.fromkeys(prefixes))
            return [[i for i, p in enumerate(prefixes) if p == n] for n in names]
        return [list(range(i, min(i + 16, len(self.genes)))) for i in range(0, len(self.genes), 16)] or [[0]]

    @property
    def clinical_dim(self) -> int:
        return len(self.numeric) + sum(len(c) for c in self.categories.values())

    def transform(self, bags: Bags) -> dict[str, np.ndarray]:
        n = len(bags)
        out: dict[str, np.ndarray] = {}
        if self.genes and bags.genomics is not None:
            position = {g: i for i, g in enumerate(bags.gene_names)}
            idx = [position[g] for g in self.genes]
            g = (bags.genomics[:, idx] - np.array(self.gene_mean)) / np.array(self.gene_std)
            present = ~np.isnan(bags.genomics[:, idx]).all(1)
            out["genomics"] = np.nan_to_num(g, nan=0.0).astype(np.float32)
            out["genomics_mask"] = present
        else:
            out["genomics"] = np.zeros((n, max(1, len(self.genes))), np.float32)
            out["genomics_mask"] = np.zeros(n, bool)
        cols = []
        for col, (mean, std) in self.numeric.items():
            v = pd.to_numeric(bags.clinical[col], errors="coerce").to_numpy(float)
            cols.append(np.nan_to_num((v - mean) / std, nan=0.0)[:, None])
        for col, cats in self.categories.items():
            levels = [canonical_level(v) for v in bags.clinical[col]]
            onehot = np.array([[lv == c for c in cats] for lv in levels], np.float32).reshape(n, len(cats))
            unknown = ~onehot.any(1)  # missing, or a level the training fold never had
            shares = np.asarray(self.category_freq.get(col) or [0.0] * len(cats), np.float32)
            onehot[unknown] = shares
            cols.append(onehot)
        out["clinical"] = np.concatenate(cols, 1).astype(np.float32) if cols else np.zeros((n, 0), np.float32)
        return out

    def unseen_levels(self, clinical_row: pd.Series) -> list[tuple[str, str]]:
        """(column, value) of the row's categorical values that the training fold never had."""
        found = []
        for col, cats in self.categories.items():
            level = canonical_level(clinical_row.get(col))
            if level is not None and level not in cats:
                found.append((col, str(clinical_row.get(col)).strip()))
        return found

    @classmethod
    def from_state(cls, state: dict) -> Preprocessor:
        """The inverse of `state()` (as stored in a fold's config.json). The clinical columns are lists
        of (column, ...) in the model's input order: a JSON object would come back with its keys
        sorted (config.json is written with sorted keys) and feed the model its columns permuted."""
        from fusion.errors import RunError

        state = dict(state)
        if isinstance(state["numeric"], dict) or isinstance(state["categories"], dict):
            raise RunError("this model was trained before its clinical column order was stored (it may read its "
                           "clinical covariates in another order than it was trained with): retrain the model")
        state["numeric"] = {col: (float(mean), float(std)) for col, mean, std in state["numeric"]}
        state["categories"] = {col: list(levels) for col, levels in state["categories"]}
        return cls(**state)

    def state(self) -> dict:
        return {"max_genes": self.max_genes, "genes": self.genes, "gene_mean": self.gene_mean,
                "gene_std": self.gene_std, "numeric": [[col, *ms] for col, ms in self.numeric.items()],
                "categories": [[col, levels] for col, levels in self.categories.items()],
                "category_freq": self.category_freq}


def _choose(n: int, max_tiles: int | None, rng: np.random.Generator | None) -> np.ndarray | None:
    """Indices of the tiles a training bag keeps (sorted, random), or None for all of them."""
    if max_tiles is None or n <= max_tiles:
        return None
    if rng is None:
        raise ValueError("collate: subsampling to max_tiles needs a random generator (rng)")
    return np.sort(rng.choice(n, max_tiles, replace=False))


def _pad(arrays: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [N_i, width] arrays to [B, max N_i (>= 1), width] with a mask [B, N] (True = real)."""
    n = max(1, max(len(a) for a in arrays))
    x = np.zeros((len(arrays), n, width), np.float32)
    mask = np.zeros((len(arrays), n), bool)
    for i, a in enumerate(arrays):
        x[i, : len(a)] = a
        mask[i, : len(a)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def collate(bags: list[np.ndarray | H5Bag], max_tiles: int | None, rng: np.random.Generator | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bags to the longest: features [B, N, D] and mask [B, N] (True = real tile).

    With `max_tiles`, a bag longer than that is subsampled at random (training only; at
    inference every tile counts); only the sampled rows of a bag left on disk are read.
    A batch of empty bags still gets N = 1 (all masked).
    """
    chosen = [_take(f, _choose(len(f), max_tiles, rng)) for f in bags]
    return _pad(chosen, chosen[0].shape[1])


def _take(features: np.ndarray | H5Bag, keep: np.ndarray | None) -> np.ndarray:
    """The kept rows (sorted indices; None = all) of a bag, as an array: an `H5Bag` reads only those."""
    return as_array(features) if keep is None else features[keep]


def batch_inputs(bags: Bags, idx, device: torch.device, max_tiles: int | None = None,
                 rng: np.random.Generator | None = None) -> dict:
    """Everything a model reads for patients `idx` (indices or a slice), padded, on `device`:
    features, mask, coords (when known), extra tile sets, genomics and clinical data.

    With `max_tiles`, each of a patient's tile sets is capped at random (training); the positions
    follow their tiles. Random draws are those of `collate` when there is no extra tile set.
    """
    rows = list(range(len(bags)))[idx] if isinstance(idx, slice) else [int(i) for i in idx]
    keep = [_choose(len(bags.features[i]), max_tiles, rng) for i in rows]
    x, mask = _pad([_take(bags.features[i], k) for i, k in zip(rows, keep, strict=True)], bags.dim)
    out = {"features": x.to(device), "mask": mask.to(device)}
    if bags.coords:
        out["coords"] = _pad([_take(bags.coords[i], k) for i, k in zip(rows, keep, strict=True)], 2)[0].to(device)
    if bags.scale_features:
        out.update(scale_features=[], scale_masks=[], scale_coords=[])
        for feats, pos in zip(bags.scale_features, bags.scale_coords, strict=True):
            keep_s = [_choose(len(feats[i]), max_tiles, rng) for i in rows]
            xs, ms = _pad([_take(feats[i], k) for i, k in zip(rows, keep_s, strict=True)], feats[rows[0]].shape[1])
            ps, _ = _pad([_take(pos[i], k) for i, k in zip(rows, keep_s, strict=True)], 2)
            out["scale_features"].append(xs.to(device))
            out["scale_masks"].append(ms.to(device))
            out["scale_coords"].append(ps.to(device))
    out.update(tabular_batch(bags, rows, device))
    return out


def tabular_batch(bags: Bags, idx, device: torch.device) -> dict[str, torch.Tensor]:
    """The preprocessed genomics/clinical tensors of patients `idx` (empty when not prepared)."""
    return {k: torch.from_numpy(np.asarray(v[idx])).to(device) for k, v in bags.tab.items()}


def feature_moments(bags: list[np.ndarray | H5Bag], max_rows: int = 200_000, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over (a sample of) the tiles of the given bags.

    The sample is `max_rows` rows drawn among all the bags' tiles (as if stacked); only those rows are
    read, so the cohort is never stacked in memory."""
    sizes = np.array([len(b) for b in bags], np.int64)
    dim = next((b.shape[1] for b in bags), 1)
    total = int(sizes.sum())
    if not total:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    if total <= max_rows:
        stacked = np.concatenate([as_array(b) for b in bags], 0)
    else:
        pick = np.random.default_rng(seed).choice(total, max_rows, replace=False)
        order = np.argsort(pick, kind="stable")
        rows = pick[order]  # sorted: each bag's share is one stretch
        starts = np.concatenate([[0], np.cumsum(sizes)])
        cuts = np.searchsorted(rows, starts)
        gathered = np.concatenate([bags[i][rows[cuts[i]:cuts[i + 1]] - starts[i]]
                                   for i in range(len(bags)) if cuts[i + 1] > cuts[i]], 0)
        stacked = np.empty_like(gathered)
        stacked[order] = gathered  # back in the order drawn: the same rows, same order as stacked[pick]
    return stacked.mean(0), stacked.std(0)
