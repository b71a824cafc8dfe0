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
    model = create_model(config["model"], **config["model_kwargs"])
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=device))
    return model.eval(), config
