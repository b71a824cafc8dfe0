"""Fit a MIL survival model on patient bags, with early stopping on an inner validation split,
and run patient-level cross-validation writing every fold's artifacts."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusion.features.extract import pick_device
from fusion.models import create_model
from fusion.storage import atomic_path, hash_config, write_json
from fusion.survival import concordance, cox_loss, efron_cox_loss, weighted_cox_loss
from fusion.train.checkpoint import save_checkpoint
from fusion.train.data import Bags, Preprocessor, collate, feature_moments, tabular_batch
from fusion.train.splits import cv_folds, inner_split


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
    device: str = "auto"
    loss: str = "auto"  # cox | weighted_cox | efron; auto: weighted_cox for biofusion, else cox
    max_genes: int = 256  # most variable genes of the training fold kept for fusion models

    def __post_init__(self) -> None:
        from fusion.models import available_models
        from fusion.train.baselines import BASELINES

        if self.model not in available_models() and self.model not in BASELINES:
            raise ValueError(f"Unknown model '{self.model}'; available: "
                             f"{', '.join(available_models() + list(BASELINES))}")
        for name in ("folds", "epochs", "batch_size", "max_tiles", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: a Cox loss compares patients within a batch")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.loss not in LOSSES and self.loss != "auto":
            raise ValueError(f"loss must be one of auto, {', '.join(LOSSES)}; got '{self.loss}'")

    @property
    def loss_fn(self):
        return LOSSES["weighted_cox" if self.loss == "auto" and self.model == "biofusion" else
                      "cox" if self.loss == "auto" else self.loss]


LOSSES = {"cox": cox_loss, "weighted_cox": weighted_cox_loss, "efron": efron_cox_loss}
MULTIMODAL = {"coattn", "biofusion", "genomics_snn"}  # models that read genomics and clinical data


def _seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@torch.no_grad()
def predict_risk(model: torch.nn.Module, bags: Bags, device: torch.device, batch_size: int = 8) -> np.ndarray:
    """Risk [P] for every bag, all tiles used."""
    model.eval()
    out = []
    for start in range(0, len(bags), batch_size):
        x, mask = collate(bags.features[start : start + batch_size], None, None)
        tab = tabular_batch(bags, slice(start, start + batch_size), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(x.to(device), mask.to(device), **tab)["risk"].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def model_kwargs(config: TrainConfig, bags: Bags, prep: Preprocessor | None) -> dict:
    kwargs = {"in_dim": bags.dim, "hidden": config.hidden, "dropout": config.dropout}
    if prep is not None and config.model in MULTIMODAL:
        kwargs.update(genomic_dim=max(1, len(prep.genes)), groups=prep.groups, clinical_dim=prep.clinical_dim)
    return kwargs


def _loss(out: dict, time: torch.Tensor, event: torch.Tensor, loss_fn) -> torch.Tensor:
    loss = loss_fn(out["risk"], time, event) + out.get("aux_loss", 0.0)
    if "branch_risk" in out:  # ACMIL: every branch is trained on the target too
        branch = out["branch_risk"]
        loss = loss + sum(loss_fn(branch[:, m], time, event) for m in range(branch.shape[1])) / branch.shape[1]
    return loss


def fit(bags: Bags, val: Bags, config: TrainConfig, seed: int,
        on_epoch: Callable[[int, dict], None] | None = None, prep: Preprocessor | None = None
        ) -> tuple[torch.nn.Module, list[dict]]:
    """Train on `bags`; keep the weights of the epoch with the best validation C-index."""
    rng = _seed_everything(seed)
    device = pick_device(config.device)
    model = create_model(config.model, **model_kwargs(config, bags, prep))
    mean, std = feature_moments(bags.features, seed=seed)
    model.set_normalisation(torch.from_numpy(mean), torch.from_numpy(std))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    time_t = torch.as_tensor(bags.time, dtype=torch.float32)
    event_t = torch.as_tensor(bags.event, dtype=torch.float32)

    best, best_state, history, stale = (-np.inf, np.inf), None, [], 0
    for epoch in range(config.epochs):
        model.train()
        order = rng.permutation(len(bags))
        losses = []
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2 or not bags.event[idx].any():
                continue  # no risk set to learn from
            x, mask = collate([bags.features[i] for i in idx], config.max_tiles, rng)
            tab = tabular_batch(bags, idx, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(x.to(device), mask.to(device), **tab)
            loss = _loss(out, time_t[idx].to(device), event_t[idx].to(device), config.loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        val_risk = predict_risk(model, val, device)
        val_c = concordance(val.time, val.event, val_risk)
        val_loss = float(cox_loss(torch.from_numpy(val_risk), torch.from_numpy(val.time),
                                  torch.from_numpy(val.event.astype(np.float32))))
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "val_c_index": val_c, "val_loss": val_loss}
        history.append(record)
        if on_epoch:
            on_epoch(epoch, record)
        score = (np.nan_to_num(val_c, nan=0.5), -val_loss)
        if score > best:
            best, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def cross_validate(bags: Bags, config: TrainConfig, out_dir: str | Path,
                   on_epoch: Callable[[int, int, dict], None] | None = None) -> dict:
    """Patient-level k-fold CV; per fold writes model, config, metrics and predictions.

    Returns the CV summary (also written to `out_dir/cv_metrics.json`).
    """
    out_dir = Path(out_dir)
    device = pick_device(config.device)
    folds = cv_folds(bags.event, config.folds, config.seed)
    fold_metrics, all_preds = [], []
    config_hash = hash_config(asdict(config))
    for k, (train_idx, test_idx) in enumerate(folds):
        # Scaling, imputation and gene selection are fitted on the training fold only.
        prep = Preprocessor(config.max_genes).fit(bags.subset(train_idx))
        bags.tab = prep.transform(bags)
        train, test = bags.subset(train_idx), bags.subset(test_idx)
        fit_idx, val_idx = inner_split(train.event, config.val_fraction, config.seed + k)
        model, history = fit(train.subset(fit_idx), train.subset(val_idx), config, seed=config.seed * 1000 + k,
                             on_epoch=(lambda e, r, k=k: on_epoch(k, e, r)) if on_epoch else None, prep=prep)
        risk = predict_risk(model, test, device)
        c = concordance(test.time, test.event, risk)
        preds = pd.DataFrame({"patient_id": test.ids, "fold": k, "risk": risk,
                              "time": test.time, "event": test.event.astype(int)})
        fold_dir = out_dir / f"fold-{k}"
        save_checkpoint(model.cpu(), config.model, model_kwargs(config, bags, prep),
                        fold_dir, extra={"train_config": asdict(config), "config_hash": config_hash,
                                         "fold": k, "encoder": config.encoder, "preprocessor": prep.state()})
        metrics = {"fold": k, "c_index": c, "n_test": len(test), "n_test_events": int(test.event.sum()),
                   "n_train": len(fit_idx), "n_val": len(val_idx),
                   "best_epoch": int(np.argmax([np.nan_to_num(h["val_c_index"], nan=0.5) for h in history])),
                   "history": history}
        write_json(fold_dir / "metrics.json", metrics)
        with atomic_path(fold_dir / "predictions.parquet") as tmp:
            preds.to_parquet(tmp, index=False)
        fold_metrics.append(metrics)
        all_preds.append(preds)

    cs = np.array([m["c_index"] for m in fold_metrics], float)
    summary = {"model": config.model, "encoder": config.encoder, "folds": config.folds,
               "c_index_mean": float(np.nanmean(cs)), "c_index_sd": float(np.nanstd(cs, ddof=1)),
               "c_index_folds": cs.tolist(), "n_patients": len(bags),
               "n_events": int(bags.event.sum()), "config": asdict(config), "config_hash": config_hash}
    write_json(out_dir / "cv_metrics.json", summary)
    with atomic_path(out_dir / "predictions.parquet") as tmp:
        pd.concat(all_preds).to_parquet(tmp, index=False)
    return summary
