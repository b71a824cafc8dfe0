"""Fit a MIL survival model on patient bags, with early stopping on an inner validation split,
and run patient-level cross-validation writing every fold's artifacts."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fusion.errors import RunError
from fusion.features.device import autocast, pick_device
from fusion.models import create_model
from fusion.storage import hash_config, write_json, write_table
from fusion.survival import concordance, cox_loss, discrete_time_bins, nll_survival_loss
from fusion.survival.horizons import nice_horizons, surv_column
from fusion.survival.losses import SURVIVAL_LOSSES, hazards_from_logits, ipcw_event_weights
from fusion.train.checkpoint import CONFIG, WEIGHTS, config_digest, save_checkpoint
from fusion.train.data import Bags, Preprocessor, batch_inputs, feature_moments
from fusion.train.folds import FoldTable, make_fold_table
from fusion.train.reference import fit_reference
from fusion.train.splits import inner_split


@dataclass(frozen=True)
class TrainConfig:
    model: str = "abmil"
    encoder: str = "morph"
    tile_set: str = ""  # which tiling of the run to train on ("" = RUN/tiles)
    folds: int = 5
    epochs: int = 60
    patience: int = 12  # epochs without validation improvement before stopping
    batch_size: int = 32  # patients per step: a Cox loss needs risk sets, not single patients
    max_tiles: int = 1024  # tiles sampled per bag per step in training; all at inference
    lr: float = 5e-4
    weight_decay: float = 1e-4
    hidden: int = 128
    dropout: float = 0.25
    val_fraction: float = 0.2
    seed: int = 0
    seeds: int = 0  # models per fold (own seed and inner split, risks averaged); 0: by training-fold size
    device: str = "auto"
    task: str = "survival"  # survival | classification (the cohort's `label` column)
    loss: str = "auto"  # cox | efron | weighted_cox | nll; auto: weighted_cox for biofusion, else cox
    n_bins: int = 4  # discrete-time bins for loss="nll" (quantiles of the training fold's event times)
    max_genes: int = 256  # most variable genes of the training fold kept for fusion models
    model_options: dict = field(default_factory=dict)  # the model's own settings (see fusion.models.registry)
    extra_tile_sets: tuple[str, ...] = ()  # other tilings of the slides (magnifications) for multi-scale models

    def __post_init__(self) -> None:
        from fusion.models import available_models
        from fusion.models.registry import check_model_options
        from fusion.train.baselines import BASELINES

        if self.model not in available_models() and self.model not in BASELINES:
            raise ValueError(f"Unknown model '{self.model}'; available: "
                             f"{', '.join(available_models() + list(BASELINES))}")
        object.__setattr__(self, "extra_tile_sets", tuple(self.extra_tile_sets))
        if self.model in available_models():
            check_model_options(self.model, self.model_options)
        if self.extra_tile_sets and self.model not in MULTISCALE:
            raise ValueError(f"extra_tile_sets {list(self.extra_tile_sets)}: only {', '.join(sorted(MULTISCALE))} "
                             f"read several tile sets, not '{self.model}'")
        if self.seeds < 0:
            raise ValueError(f"seeds must be >= 0 (0 chooses by cohort size), got {self.seeds}")
        for name in ("folds", "epochs", "batch_size", "max_tiles", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: a Cox loss compares patients within a batch")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.task not in ("survival", "classification"):
            raise ValueError(f"task must be 'survival' or 'classification', got '{self.task}'")
        if self.loss not in SURVIVAL_LOSSES and self.loss not in ("auto", "nll"):
            raise ValueError(f"loss must be one of auto, nll, {', '.join(SURVIVAL_LOSSES)}; got '{self.loss}'")

    def ensemble_size(self, n_train: int) -> int:
        """Members of the seed ensemble trained per fold (`fusion.models.ensemble`): `seeds` if set, else
        `FUSION_SEEDS` if the environment sets it (a machine-wide default, e.g. 1 for quick runs on a
        laptop), else by the training fold's size, where one network's seed and early-stopping split
        move its C most: 5 under 500 patients, 3 under 2,000, then 1. Baselines are deterministic fits:
        always 1. A fold's resume hash includes the resolved number."""
        from fusion.train.baselines import BASELINES

        if self.model in BASELINES:
            return 1
        if self.seeds:
            return self.seeds
        env = os.environ.get("FUSION_SEEDS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"FUSION_SEEDS must be a whole number >= 1, got {env!r}")
            return int(env)
        return 5 if n_train < 500 else 3 if n_train < 2000 else 1

    @property
    def discrete(self) -> bool:
        """Discrete-time hazards (MCAT's NLL) instead of a Cox log-hazard."""
        return self.loss == "nll" and self.task == "survival"

    @property
    def loss_name(self) -> str:
        """The Cox-type loss on the risk (BioFusionNet's censoring-weighted Cox for `biofusion`)."""
        if self.loss == "auto":
            return "weighted_cox" if self.model == "biofusion" else "cox"
        return "cox" if self.loss == "nll" else self.loss

    @property
    def loss_fn(self):
        return SURVIVAL_LOSSES[self.loss_name]
MULTIMODAL = {"coattn", "biofusion", "genomics_snn"}  # models that read genomics and clinical data
MULTISCALE = {"biofusion"}  # models that read extra tile sets (other magnifications)
# What each model and baseline reads: the reports derive every sentence about inputs from this.
MODEL_INPUTS = {"abmil": ("tiles",), "acmil": ("tiles",), "coattn": ("tiles", "genomics", "clinical"),
                "biofusion": ("tiles", "genomics", "clinical"), "genomics_snn": ("genomics", "clinical"),
                "clinical_cox": ("clinical",), "coxnet": ("genomics", "clinical"), "rsf": ("genomics", "clinical")}


def model_inputs(name: str) -> tuple[str, ...]:
    """The modalities model `name` reads (tiles, genomics, clinical)."""
    return MODEL_INPUTS.get(name, ("tiles", "genomics", "clinical") if name in MULTIMODAL else ("tiles",))


def _seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


INFERENCE_TILES = 1 << 16  # padded tiles per inference batch: a 10^5-tile bag is scored on its own


def inference_batches(bags: Bags, batch_size: int = 8, max_tiles: int = INFERENCE_TILES) -> list[slice]:
    """Consecutive patients grouped for inference: at most `batch_size` per batch, and at most `max_tiles`
    padded tiles (patients x the longest bag, all tile sets counted) unless one patient alone has more.
    Small bags batch as before; whole-slide bags are never padded together."""
    sizes = [len(f) + sum(len(s[i]) for s in bags.scale_features) for i, f in enumerate(bags.features)]
    out, start, longest = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and ((i - start) >= batch_size or (i - start + 1) * max(longest, n, 1) > max_tiles):
            out.append(slice(start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if len(sizes) > start:
        out.append(slice(start, len(sizes)))
    return out


@torch.no_grad()
def predict_risk(model: torch.nn.Module, bags: Bags, device: torch.device, batch_size: int = 8,
                 hazards: bool = False, max_tiles: int = INFERENCE_TILES) -> np.ndarray:
    """Risk [P] (survival) or class probabilities [P, C] (classification) for every bag, all tiles used.
    With `hazards`, the model's logits are discrete-time hazards: returns the hazards [P, K]. Patients
    are batched by `inference_batches` (at most `max_tiles` padded tiles per batch)."""
    model.eval()
    out = []
    for rows in inference_batches(bags, batch_size, max_tiles):
        inputs = batch_inputs(bags, rows, device)
        with autocast(device):
            result = model(**inputs)
        if hazards:
            out.append(hazards_from_logits(result["logits"]).cpu().numpy())
        elif "risk" in result:
            out.append(result["risk"].float().cpu().numpy())
        else:
            out.append(torch.softmax(result["logits"].float(), -1).cpu().numpy())
        del inputs, result  # one batch's tiles at a time
    return np.concatenate(out) if out else np.zeros(0)


def auc(label: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC (binary: of the second class; multi-class: macro one-vs-rest); NaN if one class only."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(label)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(label, probs[:, 1]))
    return float(roc_auc_score(label, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))


def model_kwargs(config: TrainConfig, bags: Bags, prep: Preprocessor | None) -> dict:
    n_outputs = len(bags.classes) if config.task == "classification" else config.n_bins if config.discrete else 1
    kwargs = {"in_dim": bags.dim, "hidden": config.hidden, "dropout": config.dropout, "n_outputs": n_outputs}
    if prep is not None and config.model in MULTIMODAL:
        kwargs.update(genomic_dim=max(1, len(prep.genes)), groups=prep.groups, clinical_dim=prep.clinical_dim)
    if config.model in MULTISCALE:  # several encoders per tile (the VAE splits them), extra tile sets
        kwargs.update(encoder_dims=list(bags.encoder_dims) or [bags.dim],
                      scale_dims=[_set_dim(s, bags.dim) for s in bags.scale_features])
    return {**kwargs, **config.model_options}


def _set_dim(per_patient: list[np.ndarray], default: int) -> int:
    return int(next((f.shape[1] for f in per_patient if f.ndim == 2), default))


def _loss(out: dict, time: torch.Tensor, event: torch.Tensor, label: torch.Tensor, loss_fn,
          edges: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The task's criterion on the model's output, plus its auxiliary loss; ACMIL's branches are each
    trained on the same target and their mean loss is added."""
    if edges is not None:  # discrete-time survival
        criterion, main, branches = (lambda o: nll_survival_loss(o, time, event, edges)), out["logits"], \
            out.get("branch_outputs")
    elif "logits" in out:  # classification
        criterion, main, branches = (lambda o: F.cross_entropy(o, label)), out["logits"], out.get("branch_outputs")
    else:
        criterion, main, branches = (lambda r: loss_fn(r, time, event, weight=weight)), out["risk"], \
            out.get("branch_risk")
    loss = criterion(main) + out.get("aux_loss", 0.0)
    if branches is not None:
        loss = loss + sum(criterion(branches[:, m]) for m in range(branches.shape[1])) / branches.shape[1]
    return loss


def fit(bags: Bags, val: Bags, config: TrainConfig, seed: int,
        on_epoch: Callable[[int, dict], None] | None = None, prep: Preprocessor | None = None,
        edges: torch.Tensor | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Train on `bags`; keep the weights of the epoch with the best validation C-index."""
    rng = _seed_everything(seed)
    device = pick_device(config.device)
    model = create_model(config.model, **model_kwargs(config, bags, prep))
    mean, std = feature_moments(bags.features, seed=seed)
    model.set_normalisation(torch.from_numpy(mean), torch.from_numpy(std))
    for i, feats in enumerate(bags.scale_features):  # each extra tile set standardised on its own tiles
        mean, std = feature_moments(feats, seed=seed)
        model.set_normalisation(torch.from_numpy(mean), torch.from_numpy(std), scale=i)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    time_t = torch.as_tensor(bags.time, dtype=torch.float32)
    event_t = torch.as_tensor(bags.event, dtype=torch.float32)
    classify = config.task == "classification"
    label_t = torch.as_tensor(bags.label if classify else np.zeros(len(bags), int), dtype=torch.long)
    # Censoring weights of the event terms, from the whole training set (not each batch's few patients).
    weight_t = torch.as_tensor(ipcw_event_weights(bags.time, bags.event), dtype=torch.float32) \
        if not classify and edges is None and config.loss_name == "weighted_cox" else None
    strata = bags.label if classify else bags.event

    best, best_state, history, stale, kept = (-np.inf, np.inf), None, [], 0, None
    for epoch in range(config.epochs):
        model.train()
        order = stratified_order(strata, rng)
        losses = []
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2 or (not classify and not bags.event[idx].any()):
                continue  # no risk set to learn from
            inputs = batch_inputs(bags, idx, device, config.max_tiles, rng)
            with autocast(device):
                out = model(**inputs)
            loss = _loss(out, time_t[idx].to(device), event_t[idx].to(device), label_t[idx].to(device),
                         config.loss_fn, None if edges is None else edges.to(device),
                         None if weight_t is None else weight_t[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        val_out = predict_risk(model, val, device, hazards=edges is not None)
        if edges is not None:
            val_out = hazard_risk(val_out)
        if classify:
            val_c = auc(val.label, val_out)
            val_loss = float(F.nll_loss(torch.log(torch.from_numpy(val_out).clamp_min(1e-7)),
                                        torch.from_numpy(val.label)))
        else:
            val_c = concordance(val.time, val.event, val_out)
            val_loss = float(cox_loss(torch.from_numpy(val_out), torch.from_numpy(val.time),
                                      torch.from_numpy(val.event.astype(np.float32))))
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "val_c_index" if not classify else "val_auc": val_c, "val_loss": val_loss}
        history.append(record)
        if on_epoch:
            on_epoch(epoch, record)
        score = (np.nan_to_num(val_c, nan=0.5), -val_loss)
        if score > best:
            best, best_state, stale, kept = score, copy.deepcopy(model.state_dict()), 0, epoch
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    for record in history:  # the epoch whose weights are returned (best C, then lower loss), as the record says
        record["kept"] = record["epoch"] == kept
    return model.eval(), history


def stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of patients in which every stretch holds each stratum (events and censored
    patients, or classes) in its cohort proportion, so that every batch of a Cox loss has its share
    of the rare events: each patient's key is (its rank in a shuffled stratum + U(0,1)) / stratum size."""
    strata = np.asarray(strata)
    key = np.empty(len(strata))
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        key[rng.permutation(members)] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(key, kind="stable")


def survival_horizons(train: Bags) -> list[float]:
    """Round horizons (in the cohort's time unit) at which predicted survival is reported, chosen from
    the training patients' event times only (see `fusion.survival.horizons`)."""
    return nice_horizons(train.time, train.event, train.time_unit)


def hazard_risk(hazards: np.ndarray) -> np.ndarray:
    """Risk from discrete hazards [P, K]: minus the summed survival over bins (MCAT); higher = worse."""
    return -np.cumprod(1 - hazards, axis=1).sum(1)


def discrete_curves(hazards: np.ndarray, edges: np.ndarray, horizons: list[float]) -> np.ndarray:
    """S(t) [P, T] at `horizons` from discrete hazards: the product of (1 - h_k) over bins ending by t."""
    surv = np.cumprod(1 - hazards, axis=1)
    inner = np.asarray(edges)[1:-1]  # bin k ends at inner[k]; the last bin never ends
    out = np.ones((len(hazards), len(horizons)))
    for j, t in enumerate(horizons):
        done = int(np.searchsorted(inner, t, side="right"))  # bins fully elapsed by time t
        if done:
            out[:, j] = surv[:, done - 1]
    return out


def baseline_survival(train_risk: np.ndarray, train: Bags) -> dict:
    """Breslow's baseline survival S0(t) on the training fold, as a step function {time, survival}:
    S(t | x) = S0(t) ** exp(risk(x)). Stored with each fold's checkpoint for reports."""
    from sksurv.linear_model.coxph import BreslowEstimator

    fn = BreslowEstimator().fit(train_risk, train.event, train.time).baseline_survival_
    return {"time": [float(t) for t in fn.x], "survival": [float(v) for v in fn.y]}


def survival_at(baseline: dict, risk: np.ndarray, times: list[float] | np.ndarray) -> np.ndarray:
    """S(t | x) [P, T] from a stored Breslow baseline: S0 at the last step at or before t (1 before the first)."""
    grid = np.asarray(baseline["time"])
    s0 = np.concatenate([[1.0], baseline["survival"]])[np.searchsorted(grid, np.asarray(times, float), side="right")]
    return s0[None, :] ** np.exp(np.asarray(risk, float))[:, None]


def risk_cutoffs(train_risk: np.ndarray) -> dict:
    """The training fold's median, tertiles and percentiles (0..100) of predicted risk: the thresholds
    that put a test patient into a risk group, and a percentile, without looking at the test fold."""
    return {"median": float(np.median(train_risk)),
            "tertiles": [float(q) for q in np.quantile(train_risk, [1 / 3, 2 / 3])],
            "percentiles": [float(q) for q in np.percentile(train_risk, np.arange(101))]}


def finished_fold(fold_dir: Path, fold_hash: str) -> tuple[dict, pd.DataFrame] | None:
    """(metrics, predictions) of a fold finished with the same inputs, else None.

    Every file is written atomically and `metrics.json` last, so a fold killed mid-way has no
    `metrics.json` with this hash (or an old one with another hash) and is trained again; the
    weights must also still match the sha256 in `config.json`, and `config.json` its own digest.
    """
    try:
        metrics = json.loads((fold_dir / "metrics.json").read_text())
        config = json.loads((fold_dir / CONFIG).read_text())
        if metrics.get("inputs_hash") != fold_hash or config.get("inputs_hash") != fold_hash:
            return None
        if config.get("config_sha256") != config_digest(config):
            return None
        if hashlib.sha256((fold_dir / WEIGHTS).read_bytes()).hexdigest() != config.get("weights_sha256"):
            return None
        return metrics, pd.read_parquet(fold_dir / "predictions.parquet")
    except (OSError, ValueError):
        return None


MEMBER_STRIDE = 7919  # seed offset between ensemble members (a prime: no collision with fold offsets)


def _fit_members(train: Bags, config: TrainConfig, k: int, device: torch.device, on_epoch,
                 prep: Preprocessor, edges: torch.Tensor | None) -> tuple[torch.nn.Module, list[dict], list[dict]]:
    """Fold `k`'s model: one network, or a `SeedEnsemble` of `config.ensemble_size` members, each with its
    own seed and its own stratified inner early-stopping split of the training fold. Members' risks are
    standardised by their own training-fold risks before averaging. Returns (model, the first member's
    history, one record per member)."""
    from fusion.models.ensemble import SeedEnsemble

    classify = config.task == "classification"
    val_key = "val_auc" if classify else "val_c_index"
    n_members = config.ensemble_size(len(train))
    models, records, histories = [], [], []
    for m in range(n_members):
        offset = MEMBER_STRIDE * m
        fit_idx, val_idx = inner_split(train.label if classify else train.event, config.val_fraction,
                                       config.seed + k + offset)
        progress = None
        if on_epoch:  # the fold's bar advances through every member's epochs
            progress = lambda e, r, m=m: on_epoch(k, (m * config.epochs + e) // n_members, r)  # noqa: E731
        model, member_history = fit(train.subset(fit_idx), train.subset(val_idx), config,
                                    seed=config.seed * 1000 + k + offset, on_epoch=progress, prep=prep, edges=edges)
        best = next((i for i, h in enumerate(member_history) if h["kept"]), len(member_history) - 1)
        records.append({"member": m, "n_fit": len(fit_idx), "n_val": len(val_idx), "best_epoch": best,
                        val_key: member_history[best][val_key]})
        models.append(model)
        histories.append(member_history)
    if n_members == 1:
        return models[0], histories[0], records
    ensemble = SeedEnsemble(models).to(device)
    if not classify and edges is None:
        risks = np.stack([predict_risk(member, train, device) for member in models])
        ensemble.set_risk_scale(torch.from_numpy(risks.mean(1)), torch.from_numpy(risks.std(1)))
    return ensemble.eval(), histories[0], records


def _train_fold(bags: Bags, config: TrainConfig, k: int, train_idx: np.ndarray, test_idx: np.ndarray,
                fold_dir: Path, device: torch.device, on_epoch, hashes: dict) -> tuple[dict, pd.DataFrame]:
    """Train fold `k` and write its checkpoint, predictions and (last) metrics; returns (metrics, predictions).

    Everything fitted here comes from the training patients of the fold: preprocessing, the inner
    early-stopping split, discrete-time bins, the survival horizons, the Breslow baseline and the
    risk percentiles that place a test patient in a risk group.
    """
    classify = config.task == "classification"
    metric = "auc" if classify else "c_index"
    prep = Preprocessor(config.max_genes).fit(bags.subset(train_idx))
    fold_bags = dataclasses.replace(bags, tab=prep.transform(bags))  # the caller's bags stay untouched
    train, test = fold_bags.subset(train_idx), fold_bags.subset(test_idx)
    horizons = [] if classify else survival_horizons(train)
    edges, baseline = None, None
    if config.discrete:  # bins at the quantiles of the training fold's event times (MCAT)
        edges = discrete_time_bins(torch.as_tensor(train.time), torch.as_tensor(train.event), config.n_bins)
    model, history, members = _fit_members(train, config, k, device, on_epoch, prep, edges)
    out = predict_risk(model, test, device, hazards=edges is not None)
    preds = pd.DataFrame({"patient_id": test.ids, "fold": k, "time": test.time, "event": test.event.astype(int)})
    if classify:
        score = auc(test.label, out)
        preds["label"] = [bags.classes[i] for i in test.label]
        for c, name in enumerate(bags.classes):
            preds[f"prob_{name}"] = out[:, c]
        preds["predicted"] = [bags.classes[i] for i in out.argmax(1)]
    else:
        if edges is not None:
            preds["risk"] = hazard_risk(out)
            train_risk = hazard_risk(predict_risk(model, train, device, hazards=True))
            curves = discrete_curves(out, edges.numpy(), horizons)
        else:
            preds["risk"] = out
            train_risk = predict_risk(model, train, device)
            baseline = baseline_survival(train_risk, train)
            curves = survival_at(baseline, out, horizons)
        score = concordance(test.time, test.event, preds["risk"].to_numpy())
        for j, h in enumerate(horizons):
            preds[surv_column(h)] = curves[:, j]
    save_checkpoint(model.cpu(), config.model, model_kwargs(config, bags, prep),
                    fold_dir, extra={"train_config": asdict(config), **hashes, "fold": k,
                                     "encoder": config.encoder, "preprocessor": prep.state(),
                                     "ensemble": len(members),
                                     "ensemble_risk_scale": getattr(model, "risk_scale", None),
                                     "classes": bags.classes, "horizons": horizons, "loss": config.loss_name,
                                     "bin_edges": None if edges is None else edges[1:-1].tolist(),
                                     "baseline_survival": baseline,
                                     "reference": fit_reference(train.clinical, train.clinical_types,
                                                                train.tab["genomics"] if prep.genes else None,
                                                                train.tab["genomics_mask"], train.features)})
    model.to(device)
    metrics = {"fold": k, metric: score, "n_test": len(test), "n_test_events": int(test.event.sum()),
               "n_train": members[0]["n_fit"], "n_val": members[0]["n_val"], "horizons": horizons,
               "best_epoch": members[0]["best_epoch"], "history": history, "inputs_hash": hashes["inputs_hash"]}
    if len(members) > 1:
        metrics["ensemble"] = members
    if not classify:
        metrics["train_risk_cutoffs"] = risk_cutoffs(train_risk)
    write_table(fold_dir / "predictions.parquet", preds)
    write_json(fold_dir / "metrics.json", metrics)  # last: its inputs hash marks the fold as finished
    return metrics, preds


def cross_validate(bags: Bags, config: TrainConfig, out_dir: str | Path,
                   on_epoch: Callable[[int, int, dict], None] | None = None, folds: FoldTable | None = None) -> dict:
    """Patient-level k-fold CV on the run's fold table; per fold writes model, config, metrics and predictions.

    `folds` is the run's fold table (`fusion.train.folds`): every model of a run uses it. Without one
    (a notebook, a test), a table is made from these bags with `config.folds` and `config.seed`.
    Survival: predictions hold the risk and the survival probability at the fold's horizons
    (Breslow baseline of the training fold). Classification: every class probability. Returns the
    CV summary (also written to `out_dir/cv_metrics.json`).

    Resumable at fold level: a fold whose artifacts were made from the same config, data and folds
    (the `inputs_hash` stored in its `metrics.json` and `config.json`) is read back, not trained again.
    """
    out_dir = Path(out_dir)
    device = pick_device(config.device)
    classify = config.task == "classification"
    if classify:
        if bags.label is None:
            raise ValueError("the cohort has no `label` column in cohort.yaml: cannot train a classifier")
        bags = bags.subset(np.flatnonzero(bags.label >= 0))
    if folds is None:
        folds = make_fold_table(bags.ids, bags.event, config.folds, config.seed)
    check_fold_table(folds, config)
    fold_metrics, all_preds = [], []
    config_hash = hash_config(asdict(config))
    data_hash = bags.fingerprint()
    metric = "auc" if classify else "c_index"
    for k, (train_idx, test_idx) in enumerate(folds.splits(bags.ids)):
        fold_dir = out_dir / f"fold-{k}"
        # What this fold's artifacts are a function of: a finished fold with the same hash is reused.
        fold_hash = hash_config({"config": config_hash, "data": data_hash, "fold": k, "folds": folds.fingerprint,
                                 "ensemble": config.ensemble_size(len(train_idx))})
        finished = finished_fold(fold_dir, fold_hash)
        if finished is None:
            finished = _train_fold(bags, config, k, train_idx, test_idx, fold_dir, device, on_epoch,
                                   {"config_hash": config_hash, "inputs_hash": fold_hash,
                                    "fold_table": folds.fingerprint})
        fold_metrics.append(finished[0])
        all_preds.append(finished[1])

    scores = np.array([m[metric] for m in fold_metrics], float)
    summary = {"model": config.model, "task": config.task, "encoder": config.encoder, "folds": folds.k,
               f"{metric}_mean": float(np.nanmean(scores)), f"{metric}_sd": float(np.nanstd(scores, ddof=1)),
               f"{metric}_folds": scores.tolist(), "n_patients": len(bags),
               "n_events": int(bags.event.sum()), "config": asdict(config), "config_hash": config_hash,
               "fold_table": folds.describe(), "loss": None if classify else config.loss_name,
               "networks_per_fold": [len(m.get("ensemble", [])) or 1 for m in fold_metrics]}
    if classify:
        summary["classes"] = bags.classes
    else:
        summary["horizons"] = [m.get("horizons", []) for m in fold_metrics]
    write_json(out_dir / "cv_metrics.json", summary)
    write_table(out_dir / "predictions.parquet", pd.concat(all_preds))
    return summary


def check_fold_table(folds: FoldTable, config: TrainConfig) -> None:
    """Refuse a config whose number of folds or seed differs from the table it would be trained on."""
    if (folds.k, folds.seed) != (config.folds, config.seed):
        raise RunError(f"the run's fold table has {folds.k} folds with seed {folds.seed}; this model asks for "
                       f"{config.folds} folds with seed {config.seed}. Every model of a run uses the same folds: "
                       f"set folds={folds.k}, seed={folds.seed}, or start a new run")
