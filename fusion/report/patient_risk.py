"""What a report states about one patient's risk: percentile and risk group (with the numeric cut),
and the absolute risk of the event by the report's horizons with a 95% interval (cross-fitted
recalibration, `fusion.survival.calibration`), as numbers and as a curve."""

from __future__ import annotations

import numpy as np

from fusion.report import stats
from fusion.survival.calibration import ALL, Recalibration, normal_score

GROUP_CUTS = {"median": "50th", "tertiles": "33rd and 67th"}


def risk_group(percentile: float, scheme: str) -> dict:
    """The group and the numeric threshold it was cut at, in percentiles of the training cohort."""
    group = str(stats.risk_groups([percentile], scheme)[0])
    if scheme == "median":
        rule = f"{percentile:.0f} {'≥' if group == 'high' else '<'} 50, the training cohort's median"
    else:
        rule = {"low": f"{percentile:.0f} < 33.3", "intermediate": f"33.3 ≤ {percentile:.0f} < 66.7",
                "high": f"{percentile:.0f} ≥ 66.7"}[group] + ", the training cohort's tertiles"
    return {"group": group, "rule": rule, "cuts": GROUP_CUTS.get(scheme, scheme)}


def absolute_risk(recal: Recalibration, horizons: list[float], grid: np.ndarray, percentile: float,
                  fold: int | None, fold_percentiles: list[float] | None = None, seed: int = 0) -> dict:
    """Absolute risk by each horizon with its 95% interval, and the survival curve on `grid` with its band.

    `fold` is the test fold of a patient of the training cohort (its recalibration was fitted on the
    other folds); None for a new patient, scored by every fold model (`fold_percentiles`): the
    recalibration on all patients, and each bootstrap draw also picks one fold model's percentile.
    """
    times = recal.horizons
    which = ALL if fold is None else fold
    z = normal_score([percentile])
    if fold is None and fold_percentiles:
        rng = np.random.default_rng(seed)
        draws = normal_score(np.asarray(fold_percentiles)[rng.integers(0, len(fold_percentiles),
                                                                        len(recal.gamma_boot[ALL]))])
        method = (f"bootstrap of the recalibration ({len(recal.gamma_boot[ALL])} resamples of its "
                  f"{recal.n[ALL]} patients), each resample also drawing one of the {len(fold_percentiles)} "
                  "fold models' scores")
    else:
        draws = z[0]
        method = (f"bootstrap of the recalibration ({len(recal.gamma_boot[which])} resamples of the "
                  f"{recal.n[which]} patients it was fitted on)")
    point = recal.absolute_risk(z, which)[0]
    low, high = recal.interval(draws, which)

    def at(t: float) -> int:
        return times.index(t)

    rows = [{"horizon": h, "risk": float(point[at(h)]), "low": float(low[at(h)]), "high": float(high[at(h)])}
            for h in horizons]
    idx = [at(t) for t in grid]
    curve = {"time": np.asarray(grid), "survival": 1 - point[idx], "low": 1 - high[idx], "high": 1 - low[idx],
             "band": "95% interval: " + method}
    source = ("recalibrated on the out-of-fold scores of the other folds' patients" if fold is not None else
              "recalibrated on the out-of-fold scores of every training patient")
    return {"horizons": rows, "curve": curve, "method": method, "source": source}


__all__ = ["risk_group", "absolute_risk"]
