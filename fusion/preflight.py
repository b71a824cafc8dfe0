"""Checks made before any machinery starts: what a command's config and arguments name must exist.

Prefect's server takes seconds to start (tens on a loaded machine), and a flow that fails on a
mistyped path leaves a failed run behind and prints its logs: a mistyped cohort, encoder, model,
patient or inbox is found here first and told in one line (no Prefect here).
"""

from __future__ import annotations

from pathlib import Path

from fusion.cohort import COHORT_FILE, Cohort, did_you_mean, folder_hint, load_cohort, load_spec
from fusion.errors import FusionError
from fusion.pipeline_config import PipelineConfig, PipelineConfigError
from fusion.run import RunLayout, start_run


def check_pipeline(config: PipelineConfig) -> tuple[RunLayout, Cohort]:
    """Validate everything `fusion pipeline` will use, then bind the run to the cohort (check first,
    bind after): the cohort, the encoders, the report and analysis models, the report's patients."""
    cohort = load_cohort(config.cohort)
    layout = RunLayout(Path(config.run).resolve())
    pretrained = {p.encoder for p in config.pretrain}  # made by this config's `pretrain:` section first
    check_encoders([e for e in config.extract.encoders if e not in pretrained], layout, "extract.encoders")
    for part in config.encoder.split("+"):
        if part not in config.extract.encoders and not (layout.root / "features" / part).is_dir():
            raise PipelineConfigError(f"train_encoder: '{part}' is neither extracted by this config (extract.encoders: "
                                      f"{', '.join(config.extract.encoders)}) nor in {layout.root / 'features'}")
    folders = [m.folder for m in config.models]
    if config.analysis.enabled:
        for name in config.analysis.models or []:
            _check_model(name, folders, layout, "analysis.models")
    if config.report.enabled:
        if config.report_model != "best":
            _check_model(config.report_model, folders, layout, "report.model")
        ids = list(cohort.patients.patient_id)
        unknown = [p for p in config.report.patients or [] if p not in set(ids)]
        if unknown:
            raise PipelineConfigError(f"report.patients: '{unknown[0]}' is not a patient of {cohort.root}"
                                      f"{did_you_mean(unknown[0], ids)}"
                                      + (f" ({len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""))
    return start_run(layout.root, cohort)


def check_encoders(names: list[str], layout: RunLayout | None = None, setting: str = "--encoder") -> None:
    """Each name is a registered encoder, a weights spec (`name@path`, `timm:...`) or an encoder
    trained in the run (`fusion pretrain`); else a ValueError naming the closest one."""
    from fusion.features import available_encoders

    known = available_encoders()
    for name in names:
        if name in known or "@" in name or name.startswith("timm:"):
            continue
        if layout is not None and (layout.encoder_dir(name) / "config.json").exists():
            continue
        raise PipelineConfigError(f"{setting}: unknown encoder '{name}'{did_you_mean(name, known)}; available: "
                                  f"{', '.join(known)} (or NAME@WEIGHTS, or one made by `fusion pretrain`)")


def _check_model(name: str, folders: list[str], layout: RunLayout, setting: str) -> None:
    """A model folder this config trains, one the run already holds, or a model folder of another run."""
    if name in folders or Path(name).is_dir():
        return
    if (layout.root / "models" / name).is_dir():
        return
    raise PipelineConfigError(f"{setting}: '{name}' is not a model of this config ({', '.join(folders)})"
                              f"{did_you_mean(name, folders)}")


def check_serve(config: PipelineConfig, config_path: str | Path) -> Path:
    """What scoring needs, checked before it starts: a `serve:` section, a trained model, the
    training cohort's `cohort.yaml` (the inbox's template) and the inbox folder. Returns the model folder."""
    if config.serve is None:
        raise PipelineConfigError(f"{config_path} has no `serve:` section (inbox, workdir, model)")
    serve = config.serve
    name = serve.model or config.models[0].folder
    if name == "best":  # the survival network with the highest fold-mean C, as the reports use
        name = _best_trained_network(config.run / "models", config_path)
    model_dir = config.run / "models" / name
    if not (model_dir / "fold-0" / "config.json").exists():
        trained = sorted(p.parent.parent.name for p in (config.run / "models").glob("*/fold-0/config.json"))
        raise PipelineConfigError(f"serve.model: no trained model in {model_dir}"
                                  f"{did_you_mean(model_dir.name, trained)}; run `fusion pipeline {config_path}` "
                                  "first" + (f" (trained: {', '.join(trained)})" if trained else ""))
    load_spec(Path(config.cohort))
    inbox = Path(serve.inbox)
    if not inbox.is_dir():
        raise PipelineConfigError(f"serve.inbox: the inbox folder {inbox} does not exist{folder_hint(inbox)}; "
                                  f"create it (mkdir -p {inbox}) or correct `serve.inbox` in {config_path}")
    if (inbox / COHORT_FILE).exists():
        load_spec(inbox)
    return model_dir


def _best_trained_network(models_root: Path, config_path) -> str:
    """`serve.model: best`: the trained survival network with the highest fold-mean C-index."""
    from fusion.storage import read_json
    from fusion.train.evaluate import best_network

    evaluations = []
    for metrics in sorted(models_root.glob("*/cv_metrics.json")):
        summary = read_json(metrics)
        evaluations.append({"model": metrics.parent.name, "task": summary.get("task", "survival"),
                            "c_index_mean": summary.get("c_index_mean", float("nan"))})
    try:
        return best_network(models_root, [e for e in evaluations if e["c_index_mean"] == e["c_index_mean"]])
    except FusionError as e:
        raise PipelineConfigError(f"serve.model: best: {e}; run `fusion pipeline {config_path}` first") from None
