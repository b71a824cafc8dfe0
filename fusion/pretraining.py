"""Self-supervised encoders as a resumable stage: `fusion pretrain` and the pipeline's `pretrain:` section.

An encoder pretrained on a run's tiles (MoCo v3 or DINO, `fusion.features.ssl`) is a function of
the tiles it sampled from and of its config. Its folder records the hash of both
(`RUN/encoders/<name>/inputs.json`, written last); a rerun with the same tiles and config reuses it,
so the features extracted with it stay current. New or retiled slides retrain it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fusion.cohort import Cohort
from fusion.run import RunLayout
from fusion.storage import hash_config, write_json

STAMP = "inputs.json"


def pretrain_inputs_hash(layout: RunLayout, cohort: Cohort, config, tile_set: str = "") -> str:
    """Hash of the config and of every slide's tiles (the inputs hash stored in each tiles .h5)."""
    from fusion.stages import _h5_info

    tiles = {str(sid): str(_h5_info(layout.tiles_h5(str(sid), tile_set))["attrs"].get("inputs_hash"))
             for sid in cohort.slides.slide_id}
    return hash_config({"config": asdict(config), "tiles": tiles})


def pretrain_is_current(layout: RunLayout, cohort: Cohort, config, name: str, tile_set: str = "") -> bool:
    stamp = layout.encoder_dir(name) / STAMP
    try:
        recorded = json.loads(stamp.read_text()).get("inputs_hash")
    except (OSError, ValueError):
        return False
    return recorded == pretrain_inputs_hash(layout, cohort, config, tile_set) and \
        (layout.encoder_dir(name) / "model.safetensors").exists()


def pretrain_encoder(layout: RunLayout, cohort: Cohort, config, name: str | None = None, on_epoch=None,
                     force: bool = False) -> dict:
    """Pretrain encoder `name` (default: the method) unless it is current; {'name', 'path', 'skipped'}."""
    from fusion.stages import pretrain_stage

    name = name or config.method
    if not force and pretrain_is_current(layout, cohort, config, name):
        layout.ledger.record("pretrain", name, "skipped", outputs=[str(layout.encoder_dir(name))])
        return {"name": name, "path": str(layout.encoder_dir(name)), "skipped": True}
    inputs_hash = pretrain_inputs_hash(layout, cohort, config)
    out = pretrain_stage(layout, cohort, config, name, on_epoch=on_epoch)
    write_json(Path(out) / STAMP, {"inputs_hash": inputs_hash, "config": asdict(config)})  # last
    return {"name": name, "path": str(out), "skipped": False}


__all__ = ["pretrain_encoder", "pretrain_is_current", "pretrain_inputs_hash"]
