"""What one trained fold says about one patient: risk, tile attention and integrated gradients.

Integrated gradients (Sundararajan et al., 2017) of the risk with respect to the preprocessed
genomics and clinical inputs, from the training fold's average patient (zeros for z-scored columns,
each category's share for one-hot columns) to the patient's values: attributions add up (to the
Riemann error) to risk(patient) - risk(average inputs), so a positive value is risk that input
added. The tile bag is held fixed along the path. The number of steps doubles (32 up to 512) until
that completeness error is under 5 % of the risk difference; the error reached is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fusion.survival.losses import hazards_from_logits, risk_from_hazards
from fusion.train.loop import hazard_risk

COMPLETENESS_TOLERANCE = 0.05  # |sum of attributions - risk difference| / |risk difference|


@dataclass
class FoldExplanation:
    risk: float  # log-hazard (Cox) or minus summed survival (discrete time)
    hazards: np.ndarray | None  # [K] discrete-time hazards, else None
    attention: np.ndarray  # [N] over the patient's tiles (empty without tiles)
    genomics: np.ndarray | None  # [G] attributions, None when the model takes no genomics
    clinical: np.ndarray | None  # [C] attributions
    probabilities: np.ndarray | None = None  # classification models: [C]
    completeness_error: float | None = None  # relative, of the integrated gradients (None: not computed)
    ig_steps: int = 0
    group_attention: np.ndarray | None = None  # [K] over genomic groups (co-attention models), else None


def _risk(out: dict, discrete: bool) -> torch.Tensor:
    return risk_from_hazards(out["logits"]) if discrete else out["risk"].float()


@torch.no_grad()
def _forward(model, x, mask, tab) -> dict:
    return model(x, mask, **tab)


def explain_patient(model: torch.nn.Module, features: np.ndarray, tab: dict[str, np.ndarray], discrete: bool,
                    classify: bool = False, steps: int | None = None, attribute: bool = True,
                    baselines: dict[str, np.ndarray] | None = None) -> FoldExplanation:
    """`features` [N, D] (N may be 0), `tab`: this patient's preprocessed genomics / genomics_mask /
    clinical rows (1-D arrays). Full bag, no tile cap. `attribute=False` skips the integrated
    gradients (a model that reads no genomics or clinical data); `baselines` are the starting
    inputs of the path (default zeros: the training mean of z-scored columns). `steps` fixes the
    number of integration steps; by default they double from 32 until the completeness error is
    under `COMPLETENESS_TOLERANCE` (at most 512)."""
    model.eval()
    n = len(features)
    x = torch.zeros(1, max(n, 1), features.shape[1] if features.ndim == 2 else 1)
    x[0, :n] = torch.from_numpy(np.asarray(features, np.float32))
    mask = torch.zeros(1, x.shape[1], dtype=torch.bool)
    mask[0, :n] = True
    one = {k: torch.from_numpy(np.asarray(v)[None]) for k, v in tab.items()}
    out = _forward(model, x, mask, one)
    attention = out["attention"][0, :n].float().numpy() if "attention" in out else np.zeros(n)
    groups = out["group_attention"][0].float().reshape(-1).numpy() if out.get("group_attention") is not None else None
    if classify:
        probs = torch.softmax(out["logits"].float(), -1)[0].numpy()
        return FoldExplanation(float("nan"), None, attention, None, None, probs)
    hazards = hazards_from_logits(out["logits"])[0].numpy() if discrete else None
    risk = float(hazard_risk(hazards[None])[0]) if discrete else float(out["risk"][0])
    if not attribute:
        return FoldExplanation(risk, hazards, attention, None, None, group_attention=groups)
    baselines = baselines or {}
    reference = _reference_risk(model, x, mask, one, discrete, baselines)
    for n_steps in ([steps] if steps else [32, 64, 128, 256, 512]):
        genomics, clinical = _integrated_gradients(model, x, mask, one, discrete, n_steps, baselines)
        total = sum(float(a.sum()) for a in (genomics, clinical) if a is not None)
        gap = risk - reference
        error = abs(total - gap) / abs(gap) if abs(gap) > 1e-6 else abs(total - gap)
        if genomics is None and clinical is None or error < COMPLETENESS_TOLERANCE:
            break
    return FoldExplanation(risk, hazards, attention, genomics, clinical, completeness_error=error, ig_steps=n_steps,
                           group_attention=groups)


def _reference_risk(model, x, mask, tab, discrete: bool, baselines: dict[str, np.ndarray]) -> float:
    """The risk at the start of the integration path: the same slides with the baseline inputs."""
    keys = _attributed_keys(tab)
    start = {k: torch.as_tensor(baselines.get(k, np.zeros(tab[k].shape[-1])), dtype=torch.float32)[None]
             for k in keys}
    return float(_risk(_forward(model, x, mask, {**tab, **start}), discrete)[0])


def _attributed_keys(tab) -> list[str]:
    """The inputs integrated gradients attribute to: clinical, and genomics when the patient has them."""
    keys = [k for k in ("genomics", "clinical") if k in tab and tab[k].shape[-1] > 0]
    if "genomics" in keys and "genomics_mask" in tab and not bool(tab["genomics_mask"][0]):
        keys.remove("genomics")  # no genomics: the model used its learned missing token, nothing to attribute
    return keys


def _integrated_gradients(model, x, mask, tab, discrete: bool, steps: int, baselines: dict[str, np.ndarray]):
    """Attributions for `genomics` (when present for this patient) and `clinical`, batched over the
    path: one forward/backward pass of `steps` copies of the patient."""
    keys = _attributed_keys(tab)
    if not keys:
        return None, None
    alphas = ((torch.arange(steps, dtype=torch.float32) + 0.5) / steps)[:, None]
    batch = {k: v.expand(steps, *v.shape[1:]) for k, v in tab.items()}
    start = {k: torch.as_tensor(baselines.get(k, np.zeros(tab[k].shape[-1])), dtype=torch.float32)[None]
             for k in keys}
    scaled = {k: (start[k] + alphas * (tab[k].float() - start[k])).requires_grad_(True) for k in keys}
    batch.update(scaled)
    xs, ms = x.expand(steps, *x.shape[1:]), mask.expand(steps, *mask.shape[1:])
    with torch.enable_grad():
        risk = _risk(model(xs, ms, **batch), discrete)
        grads = torch.autograd.grad(risk.sum(), [scaled[k] for k in keys], allow_unused=True)
    result = {}
    for k, g in zip(keys, grads, strict=True):
        g = torch.zeros_like(scaled[k]) if g is None else g
        result[k] = (g.mean(0) * (tab[k][0].float() - start[k][0])).numpy()
    return result.get("genomics"), result.get("clinical")
