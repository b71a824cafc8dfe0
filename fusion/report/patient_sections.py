"""The sections of one patient's report, each a dict or list for the template: what the model read
and what was missing, warnings, slides with attention, what moved the risk, the class prediction.

Every sentence about inputs follows the model's declared inputs (`fusion.train.loop.model_inputs`):
a report from a slide-only model never mentions genomics, and the absence of genomics is flagged
only for a model that reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fusion.features.extract import read_features
from fusion.report.explain import COMPLETENESS_TOLERANCE, FoldExplanation, explain_patient
from fusion.report.slide_images import slide_pictures
from fusion.train.data import Preprocessor
from fusion.train.reference import out_of_distribution as ood_notes
from fusion.wsi.tiling import read_coords

if TYPE_CHECKING:
    from fusion.report.patient import Fold, ReportContext

LITTLE_TISSUE_TILES = 50  # fewer tiles than this: the slide shows little tissue at the working resolution
NAMES = {"tiles": "slides", "genomics": "genomics", "clinical": "clinical data"}


def inputs_sentence(inputs: tuple[str, ...]) -> str:
    """'slides, genomics and clinical data' for the inputs a model reads."""
    names = [NAMES[m] for m in ("tiles", "genomics", "clinical") if m in inputs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def modalities(ctx: ReportContext, i: int, inputs: tuple[str, ...], slides: list[dict]) -> list[dict]:
    """Per modality: read by the model or not, present for this patient, and how a gap was handled."""
    clinical = ctx.bags.clinical.iloc[i] if ctx.bags.clinical is not None else pd.Series(dtype=object)
    missing_clinical = [c for c in clinical.index if pd.isna(clinical[c])]
    has_genomics = ctx.bags.genomics is not None and not np.isnan(ctx.bags.genomics[i]).all()
    n_tiles = len(ctx.bags.features[i])
    rows = [
        ("tiles", n_tiles > 0, f"{len(slides)} slide(s), {n_tiles} tiles" if n_tiles else "no usable tile",
         "the model used its learned 'no image' embedding" if len(inputs) > 1 else "no score without slides"),
        ("genomics", has_genomics, "present" if has_genomics else "absent",
         "the model used its learned 'missing genomics' input"),
        ("clinical", not missing_clinical,
         "complete" if not missing_clinical else f"missing: {', '.join(missing_clinical)}",
         "the training mean (numbers) or the training mix of categories was used"),
    ]
    return [{"name": NAMES[m], "used": m in inputs, "present": present, "detail": detail,
             "handling": handling if (m in inputs and not present) else ""}
            for m, present, detail, handling in rows]


def flags(ctx: ReportContext, i: int, risk: dict, slides: list[dict], explanations: list[FoldExplanation],
          explained: list[Fold], inputs: tuple[str, ...]) -> list[str]:
    """Data-quality warnings that concern what this model reads."""
    out = []
    if "tiles" in inputs:
        out += _slide_flags(ctx.cohort.slides_of(ctx.bags.ids[i]), slides, len(inputs) > 1)
    if "genomics" in inputs and (ctx.bags.genomics is None or np.isnan(ctx.bags.genomics[i]).all()):
        out.append("No genomics: the model used its learned 'missing genomics' input.")
    if "clinical" in inputs and ctx.bags.clinical is not None:
        row = ctx.bags.clinical.iloc[i]
        missing = [c for c in row.index if pd.isna(row[c])]
        if missing:
            out.append(f"Missing clinical value(s): {', '.join(missing)} (the training mean, or the training "
                       "mix of categories, was used).")
        unseen = sorted({f"{col} = '{value}'" for f in explained for col, value in f.prep.unseen_levels(row)})
        if unseen:
            out.append(f"Clinical value(s) never seen in training: {', '.join(unseen)}; the model used the training "
                       "cohort's mix of categories for them.")
    if not risk.get("available"):
        out.append(f"No risk could be computed: this model reads {inputs_sentence(inputs)} and the patient has none.")
    elif risk["percentile"] <= 0.5 or risk["percentile"] >= 99.5:
        out.append("The risk lies outside the range the model gave its training patients: read it with caution.")
    errors = [e.completeness_error for e in explanations if e.completeness_error is not None]
    if errors and max(errors) >= COMPLETENESS_TOLERANCE:
        out.append(f"The gene and clinical contributions are approximate: they add up to the risk difference "
                   f"only within {100 * max(errors):.0f}% (integrated gradients).")
    return out


def _slide_flags(rows: pd.DataFrame, slides: list[dict], other_inputs: bool) -> list[str]:
    out = []
    if not len(rows):
        out.append("No slide for this patient: " + ("the risk rests on the model's other inputs alone."
                                                   if other_inputs else "this model cannot score the patient."))
    for s in slides:
        if s["failed"]:
            out.append(f"Slide {s['slide_id']} failed ({s['failed']}): it is not part of this assessment.")
        elif s["n_tiles"] == 0:
            out.append(f"Slide {s['slide_id']} gave no usable tile (no tissue found or not yet processed).")
        elif s["n_tiles"] < LITTLE_TISSUE_TILES:
            out.append(f"Slide {s['slide_id']} has little tissue: {s['n_tiles']} tiles.")
    return out


def out_of_distribution(ctx: ReportContext, i: int, explained: list[Fold], inputs: tuple[str, ...]) -> list[str]:
    """Plain warnings when the patient's inputs lie outside the training patients' (first explaining fold)."""
    reference = explained[0].config.get("reference") if explained else None
    if not reference:
        return []
    k = ctx.trained.folds.index(explained[0])
    tab = ctx.tabs[k]
    genomics = tab["genomics"][i] if "genomics" in inputs and explained[0].prep.genes else None
    present = bool(tab["genomics_mask"][i])
    clinical = ctx.bags.clinical.iloc[i] if ("clinical" in inputs and ctx.bags.clinical is not None) else None
    features = ctx.bags.features[i] if "tiles" in inputs else np.zeros((0, 1))
    return ood_notes(reference, clinical, genomics, present, features)


def slides(ctx: ReportContext, pid: str, explanations: list[FoldExplanation], n_top: int) -> list[dict]:
    """Per slide: tile count, heatmap and top tiles (attention of the explaining fold models)."""
    encoders = ctx.trained.config["encoder"].split("+")
    tile_set = ctx.trained.config["train_config"].get("tile_set", "")
    attention = np.mean([e.attention for e in explanations], 0) if explanations and \
        len(explanations[0].attention) else np.zeros(0)
    out, start = [], 0
    for s in ctx.cohort.slides_of(pid).itertuples():
        info = {"slide_id": s.slide_id, "n_tiles": 0, "failed": ctx.ledger_failures.get(s.slide_id)}
        feat_paths = [ctx.layout.features_h5(e, s.slide_id, tile_set) for e in encoders]
        tiles_path = ctx.layout.tiles_h5(s.slide_id, tile_set)
        # the bag holds the slides featurised by every encoder, in this order (see load_bags)
        if all(p.exists() for p in feat_paths) and tiles_path.exists():
            _, coords, _ = read_features(feat_paths[0])
            _, attrs = read_coords(tiles_path)
            n = len(coords)
            info["n_tiles"] = n
            if n and len(attention) >= start + n:
                info.update(slide_pictures(ctx.cohort.root / s.path, coords, float(attrs["patch_size_level0"]),
                                           attention[start:start + n], n_top, mpp=_slide_mpp(s)))
            start += n
        out.append(info)
    return out


def attributions(ctx: ReportContext, explanations: list[FoldExplanation], explained: list[Fold], i: int) -> dict:
    """Gene groups, top genes and clinical factors that moved the risk (integrated gradients), the
    completeness reached, and the attention over genomic groups of a co-attention model."""
    genes = _per_name(explanations, explained, "genomics")
    groups: dict[str, float] = {}
    for name, value in genes.items():
        groups[_group_of(name)] = groups.get(_group_of(name), 0.0) + value
    clinical = _per_name(explanations, explained, "clinical")
    by_variable: dict[str, float] = {}
    for column, v in clinical.items():
        by_variable[column.split("=", 1)[0]] = by_variable.get(column.split("=", 1)[0], 0.0) + v
    values = ctx.bags.clinical.iloc[i] if ctx.bags.clinical is not None else {}
    clinical_rows = [{"name": var, "value": _display(values.get(var)), "attribution": a}
                     for var, a in by_variable.items()]
    errors = [e.completeness_error for e in explanations if e.completeness_error is not None]
    group_attention = _group_attention(explanations, explained)
    return {"groups": _top(groups, 8), "genes": _top(genes, 8),
            "clinical": _scale(sorted(clinical_rows, key=lambda r: -abs(r["attribution"]))),
            "completeness": max(errors) if errors else None, "steps": max((e.ig_steps for e in explanations),
                                                                           default=0),
            "group_attention": group_attention}


def classification(ctx: ReportContext, pid: str, i: int) -> dict | None:
    """The `<model>-classification` sibling's prediction (out-of-fold for the training cohort)."""
    c = ctx.classifier
    if c is None:
        return None
    classes = c.config.get("classes") or []
    row = c.oof[c.oof.patient_id == pid] if (c.oof is not None and ctx.same_run) else pd.DataFrame()
    if len(row):
        probs = [float(row[f"prob_{k}"].iloc[0]) for k in classes]
        source = "out-of-fold"
    else:
        feats = ctx.bags.features[i]
        if not len(feats) and c.inputs == ("tiles",):
            return None
        probs = np.mean([explain_patient(f.model, feats, {k: v[i] for k, v in tab.items()}, False,
                                         classify=True).probabilities
                         for f, tab in zip(c.folds, ctx.class_tabs, strict=True)], 0).tolist()
        source = f"mean of {len(c.folds)} fold models"
    k = int(np.argmax(probs))
    return {"model": c.name, "predicted": classes[k], "probability": probs[k], "source": source,
            "probabilities": dict(zip(classes, probs, strict=True)), "auc_mean": c.cv.get("auc_mean"),
            "auc_sd": c.cv.get("auc_sd")}


def average_clinical(prep: Preprocessor) -> np.ndarray:
    """The training fold's average patient in preprocessed clinical columns: 0 for z-scored numbers,
    each category's share for one-hot columns (zeros for models saved before shares were stored)."""
    shares = [prep.category_freq.get(col) or [0.0] * len(cats) for col, cats in prep.categories.items()]
    return np.concatenate([np.zeros(len(prep.numeric)), *map(np.asarray, shares)]).astype(np.float32)


def clinical_columns(prep: Preprocessor) -> list[str]:
    """Names of the preprocessed clinical columns, in `Preprocessor.transform` order."""
    return list(prep.numeric) + [f"{col}={c}" for col, cats in prep.categories.items() for c in cats]


def _per_name(explanations: list[FoldExplanation], explained: list[Fold], kind: str) -> dict[str, float]:
    """Mean attribution per input name over the explaining folds (folds may select different genes)."""
    totals: dict[str, float] = {}
    for e, f in zip(explanations, explained, strict=True):
        values = getattr(e, kind)
        if values is None:
            continue
        names = f.prep.genes if kind == "genomics" else clinical_columns(f.prep)
        for name, v in zip(names, values, strict=False):
            totals[name] = totals.get(name, 0.0) + float(v) / len(explanations)
    return totals


def _group_attention(explanations: list[FoldExplanation], explained: list[Fold]) -> list[dict] | None:
    """Attention over genomic groups, averaged by group name over the folds that have the group: each fold
    selected its own genes on its training patients, so folds may have different groups, or as many groups
    in another order (averaging position by position would mislabel them or fail)."""
    totals: dict[str, list[float]] = {}
    for e, f in zip(explanations, explained, strict=True):
        if e.group_attention is None or not f.prep.genes:
            continue
        names = _group_names(f.prep)
        if len(names) != len(e.group_attention):
            continue  # a fold whose groups cannot be named is left out rather than mislabelled
        for name, a in zip(names, e.group_attention, strict=True):
            totals.setdefault(name, []).append(float(a))
    if not totals:
        return None
    return _scale([{"name": n, "attribution": float(np.mean(v))} for n, v in totals.items()])


def _group_of(gene: str) -> str:
    return gene.rsplit("_", 1)[0] if "_" in gene else "genes"


def _group_names(prep: Preprocessor) -> list[str]:
    """A name per gene group (`Preprocessor.groups`): the pathway prefix, or the genes' range."""
    names = []
    for members in prep.groups:
        genes = [prep.genes[j] for j in members if j < len(prep.genes)]
        prefixes = {_group_of(g) for g in genes}
        names.append(prefixes.pop() if len(prefixes) == 1 and "genes" not in prefixes else
                     f"{genes[0]}..{genes[-1]}" if genes else "genes")
    return names


def _slide_mpp(row) -> float | None:
    """The cohort's per-slide mpp hint (optional `mpp` column of slides.csv)."""
    value = getattr(row, "mpp", None)
    return float(value) if value is not None and pd.notna(value) else None


def _display(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "missing"
    return str(value)


def _top(attributions: dict[str, float], n: int) -> list[dict]:
    rows = [{"name": k, "attribution": v} for k, v in attributions.items()]
    rows.sort(key=lambda r: -abs(r["attribution"]))
    return _scale(rows[:n])


def _scale(rows: list[dict]) -> list[dict]:
    """Bar widths (percent of the largest |attribution|) for the HTML bars."""
    top = max((abs(r["attribution"]) for r in rows), default=0.0) or 1.0
    return [{**r, "width": 100 * abs(r["attribution"]) / top} for r in rows]
