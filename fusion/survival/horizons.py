"""Time horizons for predicted survival, td-AUC and calibration, chosen from training data only.

A horizon is a round number in the cohort's time unit (12, 24, 36 months; 1, 2, 5 years), never
an odd value such as 23.0 months: multiples of the smallest "nice" step that gives at most
`max_points` horizons up to the 90th percentile of the training patients' event times. Each fold
chooses from its own training patients; a cohort statistic uses the horizons every fold chose.
"""

from __future__ import annotations

import numpy as np

NICE_STEPS = {
    "days": [7, 14, 30, 60, 90, 180, 365, 730, 1825],
    "weeks": [1, 2, 4, 8, 13, 26, 52, 104, 260],
    "months": [1, 2, 3, 6, 12, 24, 60, 120],
    "years": [0.25, 0.5, 1, 2, 5, 10],
}


def nice_horizons(time: np.ndarray, event: np.ndarray, unit: str = "months", max_points: int = 8) -> list[float]:
    """Round horizons inside the training follow-up (see module docstring); at least one."""
    if unit not in NICE_STEPS:
        raise ValueError(f"unknown time unit '{unit}': use one of {', '.join(NICE_STEPS)}")
    time, event = np.asarray(time, float), np.asarray(event).astype(bool)
    observed = time[event] if event.sum() >= 2 else time
    top = float(np.quantile(observed, 0.9))
    for step in NICE_STEPS[unit]:
        count = int(np.floor(top / step + 1e-9))
        if 1 <= count <= max_points:
            return [round(step * i, 6) for i in range(1, count + 1)]
    # follow-up shorter than the smallest step, or longer than max_points of the largest one
    step = NICE_STEPS[unit][0] if top < NICE_STEPS[unit][0] else NICE_STEPS[unit][-1]
    return [float(step)] if top < step else [round(step * i, 6) for i in range(1, max_points + 1)]


def common_horizons(per_fold: list[list[float]]) -> list[float]:
    """The horizons every fold chose (each from its own training patients)."""
    if not per_fold:
        return []
    common = set(per_fold[0])
    for h in per_fold[1:]:
        common &= set(h)
    return sorted(common)


def surv_column(horizon: float) -> str:
    """Name of the predictions column holding S(horizon)."""
    return f"surv_{horizon:g}"





# Horizons clinicians quote (1, 3, 5, 10 years), in each time unit.
CLINICAL_HORIZONS = {"days": [365, 1095, 1825, 3650], "weeks": [52, 156, 260, 520], "months": [12, 36, 60, 120],
                     "years": [1, 3, 5, 10]}


def report_horizons(common: list[float], unit: str, configured: list[float] | None = None,
                    max_points: int = 3) -> list[float]:
    """Horizons at which a report states absolute risk: the configured ones (e.g. 60 and 120 months),
    or the clinical ones (1, 3, 5, 10 years) that lie within the follow-up every fold's training
    patients had (the largest horizon they chose); at least one, from `common`, otherwise."""
    limit = max(common) if common else 0.0
    if configured:
        beyond = [h for h in configured if h > limit]
        if beyond:
            raise ValueError(f"horizon(s) {', '.join(f'{h:g}' for h in beyond)} {unit} lie beyond the follow-up "
                             f"of the training folds (the last horizon they support is {limit:g} {unit})")
        return sorted(float(h) for h in configured)
    chosen = [float(h) for h in CLINICAL_HORIZONS.get(unit, []) if h <= limit][:max_points]
    return chosen or ([float(common[len(common) // 2])] if common else [])
__all__ = ["nice_horizons", "common_horizons", "surv_column", "report_horizons", "NICE_STEPS", "CLINICAL_HORIZONS"]
