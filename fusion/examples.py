"""Example cohorts from real public data that ship inside installed packages (no download).

`fusion example NAME --out DIR` writes a cohort folder (cohort.yaml, patients.csv, an empty
slides.csv) from a data set bundled with scikit-survival or lifelines. They are clinical only: no
installable package ships real H&E slides (openslide-python's test files are test patterns), and the
one genomic survival set that ships (scikit-survival's breast cancer data) is kept out on purpose,
for an independent check. Columns that are not known at baseline are dropped (FLCHAIN's cause of
death, for one). Times are in days, as the sources give them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from fusion.storage import write_table, write_text


@dataclass(frozen=True)
class Example:
    name: str
    title: str
    source: str
    population: str
    predicts: str
    load: Callable[[], pd.DataFrame]  # columns: time, event, then the clinical covariates
    clinical: dict[str, str]
    dropped: dict[str, str] = field(default_factory=dict)  # column -> why it is left out


def _sksurv(loader: str, event: str, time: str, drop: tuple[str, ...] = ()) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        import sksurv.datasets as datasets

        x, y = getattr(datasets, loader)()
        frame = x.drop(columns=list(drop)).copy()
        for col in frame.columns:
            if isinstance(frame[col].dtype, pd.CategoricalDtype):
                frame[col] = frame[col].astype(str)
        frame.insert(0, "event", y[event].astype(int))
        frame.insert(0, "time", y[time].astype(float))
        return frame

    return load


def _lifelines_lung() -> pd.DataFrame:
    from lifelines.datasets import load_lung

    df = load_lung().drop(columns=["inst"])
    return df.rename(columns={"status": "event", "ph.ecog": "ph_ecog", "ph.karno": "ph_karno",
                              "pat.karno": "pat_karno", "meal.cal": "meal_cal", "wt.loss": "wt_loss"})


EXAMPLES = {e.name: e for e in [
    Example("gbsg2", "German Breast Cancer Study Group 2", "scikit-survival load_gbsg2 (Schumacher et al. 1994)",
            "women with primary node-positive breast cancer enrolled in the GBSG-2 trial (1984-1989)",
            "recurrence-free survival", _sksurv("load_gbsg2", "cens", "time"),
            {"age": "numeric", "estrec": "numeric", "horTh": "categorical", "menostat": "categorical",
             "pnodes": "numeric", "progrec": "numeric", "tgrade": "categorical", "tsize": "numeric"}),
    Example("whas500", "Worcester Heart Attack Study (500 patients)", "scikit-survival load_whas500 (Hosmer et al.)",
            "patients admitted with acute myocardial infarction to hospitals in Worcester, Massachusetts",
            "overall survival after admission", _sksurv("load_whas500", "fstat", "lenfol"),
            {"afb": "categorical", "age": "numeric", "av3": "categorical", "bmi": "numeric", "chf": "categorical",
             "cvd": "categorical", "diasbp": "numeric", "gender": "categorical", "hr": "numeric", "los": "numeric",
             "miord": "categorical", "mitype": "categorical", "sho": "categorical", "sysbp": "numeric"}),
    Example("veterans", "Veterans' Administration lung cancer trial",
            "scikit-survival load_veterans_lung_cancer (Kalbfleisch and Prentice 1980)",
            "men with advanced inoperable lung cancer in a randomised trial of two chemotherapies",
            "overall survival", _sksurv("load_veterans_lung_cancer", "Status", "Survival_in_days"),
            {"Age_in_years": "numeric", "Celltype": "categorical", "Karnofsky_score": "numeric",
             "Months_from_Diagnosis": "numeric", "Prior_therapy": "categorical", "Treatment": "categorical"}),
    Example("flchain", "Serum free light chain cohort (Olmsted County)",
            "scikit-survival load_flchain (Dispenzieri et al. 2012)",
            "residents of Olmsted County, Minnesota, aged 50 or more, with a stored serum sample",
            "overall survival", _sksurv("load_flchain", "death", "futime", drop=("chapter",)),
            {"age": "numeric", "creatinine": "numeric", "flc.grp": "categorical", "kappa": "numeric",
             "lambda": "numeric", "mgus": "categorical", "sample.yr": "numeric", "sex": "categorical"},
            {"chapter": "the cause of death: known only after the outcome"}),
    Example("aids", "AIDS Clinical Trials Group 320", "scikit-survival load_aids (Hammer et al. 1997)",
            "HIV-infected adults with CD4 counts of 200/mm3 or fewer and prior zidovudine, in a randomised trial",
            "time to AIDS-defining event or death", _sksurv("load_aids", "censor", "time", drop=("txgrp", "strat2")),
            {"age": "numeric", "cd4": "numeric", "hemophil": "categorical", "ivdrug": "categorical",
             "karnof": "numeric", "priorzdv": "numeric", "raceth": "categorical", "sex": "categorical",
             "tx": "categorical"},
            {"txgrp": "treatment arm and CD4 stratum together (tx and cd4 already given)",
             "strat2": "a cut of cd4 (given as a number)"}),
    Example("lung", "NCCTG advanced lung cancer", "lifelines load_lung (Loprinzi et al. 1994)",
            "patients with advanced lung cancer from the North Central Cancer Treatment Group",
            "overall survival", _lifelines_lung,
            {"age": "numeric", "sex": "categorical", "ph_ecog": "categorical", "ph_karno": "numeric",
             "pat_karno": "numeric", "meal_cal": "numeric", "wt_loss": "numeric"},
            {"inst": "the institution code: an administrative id, not a patient property"}),
]}


def write_example(name: str, out: str | Path) -> Path:
    """Write example cohort `name` into `out` (a new cohort folder); returns the folder."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example '{name}'; available: {', '.join(EXAMPLES)}")
    ex = EXAMPLES[name]
    out = Path(out)
    frame = ex.load()
    frame.insert(0, "patient_id", [f"{name.upper()}-{i + 1:04d}" for i in range(len(frame))])
    write_table(out / "patients.csv", frame[["patient_id", "time", "event", *ex.clinical]])
    write_table(out / "slides.csv", pd.DataFrame(columns=["slide_id", "patient_id", "path"]))
    spec = {"name": name, "time_unit": "days", "outcome": {"time": "time", "event": "event"},
            "clinical": ex.clinical, "description": f"{ex.title}. Source: {ex.source}.",
            "intended_use": {"population": ex.population, "predicts": ex.predicts,
                             "not_for": "clinical decisions: a public research data set, used here to "
                                        "demonstrate and benchmark the pipeline"}}
    if ex.dropped:
        spec["description"] += " Left out: " + "; ".join(f"{k} ({v})" for k, v in ex.dropped.items()) + "."
    write_text(out / "cohort.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return out


__all__ = ["EXAMPLES", "write_example"]
