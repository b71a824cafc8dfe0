"""Figures for the cohort analysis and the patient reports (matplotlib, Agg backend).

Every function returns a Figure; `save` writes PNG + SVG next to each other and returns the PNG
bytes, which the HTML reports embed as data URIs.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fusion.storage import atomic_path  # noqa: E402

GROUP_COLOURS = {"low": "#2b8cbe", "intermediate": "#f0a30a", "high": "#d7301f"}
plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                     "figure.dpi": 100, "savefig.bbox": "tight"})


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save(fig, stem: str | Path, dpi: int = 110) -> bytes:
    """Write `stem`.svg and `stem`.png (atomically); return the PNG bytes."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(stem.with_suffix(".svg")) as tmp:
        fig.savefig(tmp, format="svg")
    data = png_bytes(fig, dpi)
    with atomic_path(stem.with_suffix(".png")) as tmp:
        tmp.write_bytes(data)
    return data


def _step_band(ax, curve: dict, colour: str, label: str, alpha: float = 0.15, lw: float = 1.6) -> None:
    t = np.concatenate([[0.0], curve["time"]])
    s = np.concatenate([[1.0], curve["survival"]])
    ax.step(t, s, where="post", color=colour, lw=lw, label=label)
    if "low" in curve:
        ax.fill_between(t, np.concatenate([[1.0], curve["low"]]), np.concatenate([[1.0], curve["high"]]),
                        step="post", color=colour, alpha=alpha, lw=0)


def km_figure(km: dict, time_unit: str, title: str = "", patient: dict | None = None, size=(5.2, 3.4)):
    """Kaplan-Meier curves (95% bands) per risk group with the log-rank p; optionally one patient's
    predicted survival curve and band drawn over them."""
    fig, ax = plt.subplots(figsize=size)
    for group, curve in km["groups"].items():
        emphasis = patient is None or patient.get("group") == group
        _step_band(ax, curve, GROUP_COLOURS[group], f"{group} risk (n={curve['n']}, {curve['events']} events)",
                   alpha=0.15 if emphasis else 0.05, lw=1.6 if emphasis else 0.9)
    if patient is not None:
        t = np.asarray(patient["time"])
        ax.plot(t, patient["survival"], color="black", lw=2.2, label="this patient (predicted)")
        ax.fill_between(t, patient["low"], patient["high"], color="black", alpha=0.12, lw=0)
    p = km.get("logrank_p")
    ax.set_title(title + (f"  (log-rank p = {p:.2g})" if p is not None and np.isfinite(p) else ""), fontsize=9)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.legend(frameon=False, fontsize=7.5, loc="lower left")
    return fig


def calibration_figure(calibrations: dict[str, list[dict]], time_unit: str):
    """Observed (Kaplan-Meier, 95% CI) against predicted risk of the event by each horizon, one panel
    per horizon, one series per kind of prediction (e.g. the fold models' own, recalibrated)."""
    horizons = [c["horizon"] for c in next(iter(calibrations.values()))]
    fig, axes = plt.subplots(1, len(horizons), figsize=(3.1 * len(horizons), 3.2), squeeze=False)
    colours = ["#2b8cbe", "#d7301f", "#333333"]
    top = max([g["observed_high"] for cal in calibrations.values() for c in cal for g in c["groups"]] +
              [g["predicted"] for cal in calibrations.values() for c in cal for g in c["groups"]] + [0.1])
    top = min(1.0, top * 1.1)
    for ax, j in zip(axes[0], range(len(horizons)), strict=True):
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
        for (name, cal), colour in zip(calibrations.items(), colours, strict=False):
            c = cal[j]
            g = pd.DataFrame(c["groups"])
            if not len(g):
                continue
            err = np.abs(g[["observed_low", "observed_high"]].to_numpy().T - g["observed"].to_numpy())
            slope = f", slope {c['slope']:.2f}" if "slope" in c else ""
            ax.errorbar(g["predicted"], g["observed"], yerr=err, fmt="o-", ms=4, lw=0.8, color=colour, capsize=2,
                        label=f"{name} (O/E {c['o_e']:.2f}{slope})")
        ax.set_title(f"by {horizons[j]:g} {time_unit}", fontsize=9)
        ax.set_xlabel("predicted risk of the event")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.legend(frameon=False, fontsize=6.5, loc="upper left")
    axes[0][0].set_ylabel("observed risk (Kaplan-Meier)")
    return fig


def decision_curve_figure(curve: pd.DataFrame, horizon: float, time_unit: str, title: str = ""):
    """Net benefit of the model against treating everyone and no one, by threshold risk."""
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ax.plot(curve["threshold"], curve["model"], color="#d7301f", lw=1.6, label="act on the model's high risk")
    ax.plot(curve["threshold"], curve["treat_all"], color="#333", lw=1.0, ls="--", label="act on everyone")
    ax.axhline(0, color="grey", lw=0.8, label="act on no one")
    top = max(curve["model"].max(), curve["treat_all"].max(), 0.01)
    ax.set_ylim(-0.1 * top, 1.15 * top)
    ax.set_xlabel(f"threshold risk of the event by {horizon:g} {time_unit}")
    ax.set_ylabel("net benefit")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=7)
    return fig


def td_auc_figure(curves: dict[str, tuple[list[float], list[float]]], time_unit: str):
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for name, (times, auc) in curves.items():
        ax.plot(times, auc, marker="o", ms=3, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel("time-dependent AUC")
    ax.set_ylim(0.3, 1.0)
    ax.legend(frameon=False, fontsize=7)
    return fig


def forest_figure(table: pd.DataFrame):
    """Hazard ratios with 95% CI on a log axis (one row per term)."""
    fig, ax = plt.subplots(figsize=(4.6, 0.35 * len(table) + 0.8))
    y = np.arange(len(table))[::-1]
    ax.errorbar(table["hr"], y, xerr=[table["hr"] - table["ci_low"], table["ci_high"] - table["hr"]],
                fmt="s", color="#333", capsize=2, ms=4)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(y, table["term"])
    ax.set_xlabel("hazard ratio (95% CI)")
    return fig


def roc_figure(y: np.ndarray, score: np.ndarray, title: str):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, score)
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    ax.plot(fpr, tpr, color="#d7301f")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    return fig
