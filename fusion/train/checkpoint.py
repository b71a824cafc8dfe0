"""Checkpoints: weights in safetensors, configuration in JSON; never pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from fusion.models import create_model
from fusion.storage import _json_default, atomic_path, read_json, write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_checkpoint(model: nn.Module, model_name: str, model_kwargs: dict, folder: str | Path,
                    extra: dict | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (with the weights' sha256) into `folder`."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    config = {"model": model_name, "model_kwargs": model_kwargs, "weights_sha256": digest, **(extra or {})}
    config = json.loads(json.dumps(config, default=_json_default))  # the digest is of what is read back
    write_json(folder / CONFIG, {**config, "config_sha256": config_digest(config)})
    return folder


def config_digest(config: dict) -> str:
    """sha256 of a checkpoint's config (canonical JSON, without the digest itself): the model's
    fingerprint covers what is read with the weights (architecture, preprocessing, cut-offs)."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load_checkpoint(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, config). Refuses weights whose hash differs from the config's."""
    folder = Path(folder)
    config = read_json(folder / CONFIG)
    data = (folder / WEIGHTS).read_bytes()
    if hashlib.sha256(data).hexdigest() != config.get("weights_sha256"):
        raise ValueError(f"{folder / WEIGHTS} does not match the sha256 in {CONFIG}: refusing to load")
    if config.get("config_sha256") != config_digest(config):
        raise ValueError(f"{folder / CONFIG} was changed after training (or saved before config checksums): "
                         "refusing to load; train the model again")
    n_members = int(config.get("ensemble", 1))
    if n_members > 1:  # a seed ensemble (fusion.models.ensemble): members of one architecture
        from fusion.models.ensemble import SeedEnsemble

        model = SeedEnsemble([create_model(config["model"], **config["model_kwargs"]) for _ in range(n_members)],
                             risk_scale=config.get("ensemble_risk_scale", "unit"))
    else:
        model = create_model(config["model"], **config["model_kwargs"])
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=device))
    return model.eval(), config


def fold_dirs(model_dir: str | Path) -> list[Path]:
    """The fold folders of a cross-validated model in fold order (fold-2 before fold-10), checked
    against the training manifest (`cv_metrics.json`): exactly folds 0..k-1, each trained with the
    manifest's config and fold table. A missing, extra or foreign fold would silently change every
    patient's percentile and risk group, so any mismatch is refused with what is wrong."""
    from fusion.errors import RunError

    model_dir = Path(model_dir)
    found: dict[int, Path] = {}
    for path in model_dir.glob("fold-*"):
        if not (path / WEIGHTS).exists():
            continue
        number = path.name[len("fold-"):]
        if not number.isdigit():
            raise RunError(f"{path} is not a fold folder (expected fold-<number>); move it out of {model_dir}")
        found[int(number)] = path
    if not found:
        raise RunError(f"no fold checkpoints (fold-*/{WEIGHTS}) in {model_dir}; baselines keep no weights, "
                       "so scoring needs a trained network (e.g. `fusion train RUN --model biofusion`)")
    manifest_path = model_dir / "cv_metrics.json"
    if not manifest_path.exists():
        raise RunError(f"{manifest_path} is missing: the model's training did not finish; train it again")
    manifest = read_json(manifest_path)
    k = int(manifest.get("folds") or len(found))
    missing = sorted(set(range(k)) - set(found))
    extra = sorted(set(found) - set(range(k)))
    if missing or extra:
        parts = ([f"missing fold(s) {', '.join(map(str, missing))}"] if missing else []) + \
                ([f"unexpected fold(s) {', '.join(map(str, extra))}"] if extra else [])
        raise RunError(f"{model_dir} was trained with {k} folds but has {'; '.join(parts)}: "
                       "refusing to score with an incomplete or mixed set of fold models; retrain the model")
    table = (manifest.get("fold_table") or {}).get("fingerprint")
    for _, path in sorted(found.items()):
        config = read_json(path / CONFIG)
        if manifest.get("config_hash") and config.get("config_hash") != manifest["config_hash"]:
            raise RunError(f"{path} was trained with another configuration than {manifest_path} records "
                           f"({config.get('config_hash')} vs {manifest['config_hash']}); retrain the model")
        if table and config.get("fold_table") not in (None, table):
            raise RunError(f"{path} was trained on another fold table than {manifest_path} records; retrain the model")
    return [found[i] for i in range(k)]
