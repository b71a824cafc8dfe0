"""`fusion`: the command line. Each stage is a subcommand; `fusion run` runs them all as a Prefect flow."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fusion.errors import FusionError, storage_error


def error_line(e: BaseException) -> tuple[str, int]:
    """What the user is told about an error that ended a command, and the exit code: bad input or a
    refusing environment (2: one line saying what to do), or a bug (3: one line; FUSION_DEBUG=1
    shows the traceback)."""
    storage = storage_error(e)
    if storage is not None:
        return str(storage), 2
    if isinstance(e, FusionError | ValueError):
        return str(e), 2
    if isinstance(e, OSError):
        what = e.strerror or str(e)
        return (f"{what}: {e.filename}" if e.filename else what), 2
    if isinstance(e, KeyboardInterrupt):
        return "interrupted; every finished file is complete, and a rerun picks up where this one stopped", 130
    return (f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:300]} (a bug in fusion: rerun with "
            "FUSION_DEBUG=1 to see where, and report it)"), 3


class _Commands(TyperGroup):
    """Every command ends in a result or one error line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the last line of defence
            if os.environ.get("FUSION_DEBUG"):
                raise
            message, code = error_line(e)
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None


# Only what `fusion --help` needs is imported here: each command imports its own libraries (torch,
# scikit-survival, Prefect, rich's progress and tables), so start-up stays ~0.2 s (issue 17).

# rich_markup_mode=None: click's plain help. Typer's rich help imports rich's Markdown renderer (~0.1 s,
# half of `fusion --help`); the commands still print with rich.
app = typer.Typer(help="Multimodal pathology pipeline: slides -> tiles -> features -> fusion models -> risk.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None, cls=_Commands)
cohort_app = typer.Typer(help="Inspect and validate cohort folders.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cohort_app, name="cohort")
console = Console()
err = Console(stderr=True)


def _progress():
    """A bar with counts (done/total), time elapsed and time left, for a stage that is running."""
    from rich import progress as rp

    return rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                       rp.TimeElapsedColumn(), rp.TextColumn("eta"), rp.TimeRemainingColumn(), console=console,
                       transient=False)


def _counter(progress, description: str):
    """A callback (done, total[, description]) drawing a bar that appears with its first call: work
    found up to date (never counted) shows no bar."""
    ids: list = []

    def update(done: float, total: float | None, text: str | None = None) -> None:
        if not ids:
            ids.append(progress.add_task(description, total=total))
        progress.update(ids[0], completed=done, total=total, **({"description": text} if text else {}))

    update.shown = lambda: bool(ids)
    return update


def Table(*columns: str, **kwargs):  # noqa: N802 - rich's class, imported when a command prints one
    from rich.table import Table

    return Table(*columns, **kwargs)


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {escape(error_line(e)[0])}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write the cohort into.")],
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 250,
    seed: Annotated[int, typer.Option(help="Random seed (the cohort is a function of it).")] = 0,
    slide_px: Annotated[int, typer.Option(help="Long side of each slide's level 0, pixels.")] = 4096,
    mpp: Annotated[float, typer.Option(help="Microns per pixel at level 0 (0.5 = 20x, 0.25 = 40x).")] = 0.5,
    missing_genomics: Annotated[float, typer.Option(help="Fraction of patients without genomics.")] = 0.0,
    missing_slides: Annotated[float, typer.Option(help="Fraction of patients without slides.")] = 0.0,
    pen_prob: Annotated[float, typer.Option(help="Chance that a slide carries pen marks.")] = 0.3,
    debris: Annotated[int, typer.Option(help="Specks of debris on each slide's glass.")] = 6,
    region_um: Annotated[float, typer.Option(help="Size scale of morphology regions, um.")] = 120.0,
    workers: Annotated[int, typer.Option(help="Processes rendering slides (0: one per core).")] = 0,
    context_signal: Annotated[float, typer.Option(help="Weight of a risk carried by lymphocytes lying next to "
                                                  "tumour (spatial context); 0 = off.")] = 0.0,
    scale_signal: Annotated[float, typer.Option(help="Weight of a risk seen only at low magnification (tumour "
                                                "gathered or dispersed); 0 = off.")] = 0.0,


    id_prefix: Annotated[str, typer.Option(help="Patient ids are PREFIX + a 4-digit number; new patients to score "
                                           "need ids no training cohort uses (e.g. --id-prefix N).")] = "P",
    id_offset: Annotated[int, typer.Option(help="First patient number (e.g. 250 after a 250-patient cohort).")] = 0,
) -> None:
    """Generate a synthetic cohort: pyramidal H&E-like slides, genomics, clinical data, outcomes.

    Ground truth (true risk, tissue and morphology maps) goes to OUT/truth/, outside the tables.
    For new patients to score with a model trained on another synthetic cohort, use another
    --seed and --id-prefix (or --id-offset), so that no id names two patients.
    """
    from fusion.synth import SynthConfig, synthesize_cohort

    config = SynthConfig(patients=patients, seed=seed, slide_px=slide_px, mpp=mpp,
                         missing_genomics=missing_genomics, missing_slides=missing_slides, workers=workers,
                         pen_prob=pen_prob, debris=debris, region_um=region_um, context_signal=context_signal,
                         scale_signal=scale_signal, id_prefix=id_prefix, id_offset=id_offset)
    try:
        with _progress() as progress:
            synthesize_cohort(out, config, on_slide=_counter(progress, f"synthesising {patients} patients: slides"))
    except ValueError as e:
        _fail(e)
    console.print(f"cohort written to [bold]{out}[/]")


@app.command()
def example(
    name: Annotated[str, typer.Argument(help="Example cohort: gbsg2, whas500, veterans, flchain, aids, lung.")],
    out: Annotated[Path, typer.Option(help="Folder to write the cohort into.")],
    run: Annotated[Path | None, typer.Option(help="Also start a run folder for it (no slides: train at once, "
                                             "e.g. `fusion train RUN --model coxnet`).")] = None,
) -> None:
    """Write a cohort folder from real public data bundled with scikit-survival or lifelines (clinical only)."""
    from fusion.examples import EXAMPLES, write_example

    try:
        folder = write_example(name, out)
        if run is not None:
            from fusion.run import init_run

            init_run(run, folder)
    except (FusionError, ValueError) as e:
        _fail(e)
    ex = EXAMPLES[name]
    console.print(f"{ex.title}: cohort written to [bold]{folder}[/] ({ex.source})"
                  + (f"; run folder [bold]{run}[/]" if run else ""))


@cohort_app.command("validate")
def cohort_validate(
    folder: Annotated[Path, typer.Argument(help="Cohort folder with cohort.yaml.")],
    strict: Annotated[bool, typer.Option(help="A missing slide file is an error (default: a warning; that "
                                         "slide alone fails when the pipeline runs).")] = False,
) -> None:
    """Check cohort.yaml and every table; list every problem at once (file, line, column)."""
    from fusion.cohort import load_cohort

    try:
        cohort = load_cohort(folder, strict=strict)
    except FusionError as e:
        _fail(e)
    for problem in cohort.missing_slides.values():
        err.print(f"[yellow]warning:[/] {escape(problem)} (this slide will fail alone; --strict makes it an error)",
                  highlight=False)
    g = "none" if cohort.genomics is None else f"{cohort.genomics.shape[1]} genes for {len(cohort.genomics)}"
    console.print(f"[green]ok[/]: {len(cohort.patients)} patients ({int(cohort.event.sum())} events), "
                  f"{len(cohort.slides)} slides, genomics: {g}")


@app.command()
def tile(
    cohort: Annotated[Path, typer.Argument(help="Cohort folder.")],
    out: Annotated[Path, typer.Option(help="Run folder (created if missing).")],
    target_mpp: Annotated[float, typer.Option(help="Tile resolution in um/px (0.5 ~ 20x, 0.25 ~ 40x).")] = 0.5,
    magnification: Annotated[float | None, typer.Option(help="Target magnification instead of --target-mpp "
                                                        "(20 -> 0.5 um/px).")] = None,
    patch_size: Annotated[int, typer.Option(help="Tile size in pixels at the target resolution.")] = 256,
    min_tissue: Annotated[float, typer.Option(help="Minimum fraction of tissue in a tile.")] = 0.5,
    overlap: Annotated[float, typer.Option(help="Fraction of a tile shared with its neighbour.")] = 0.0,
    preset: Annotated[str, typer.Option(help="Tissue detection preset: resection, biopsy, strict.")] = "resection",
    tissue: Annotated[list[str], typer.Option(help="Override a tissue parameter, e.g. "
                                              "--tissue close_um=32 (repeatable).")] = [],
    mpp: Annotated[float | None, typer.Option(help="Override the slides' level-0 um/px (for slides "
                                              "without resolution metadata).")] = None,
    tile_set: Annotated[str, typer.Option("--set", help="Name of this tiling, to keep several per run apart "
                                          "(e.g. --set 40x writes RUN/tiles/40x/).")] = "",
    workers: Annotated[int, typer.Option(help="Slides tiled at once.")] = 2,
    local: Annotated[bool, typer.Option(help="Run in this process without Prefect.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit non-zero when any slide fails.")] = False,
    dask_address: Annotated[str | None, typer.Option(help="Run the per-slide tasks on this Dask scheduler "
                                                     "(tcp://host:8786).")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="Run the per-slide tasks on a local Dask cluster "
                                                     "of this many processes.")] = None,
) -> None:
    """Find tissue and cut each slide into a tile grid (coords .h5 + QC picture per slide).

    Runs as a Prefect flow with one task per slide; a rerun skips slides already tiled with the
    same content and parameters. A slide that cannot be read is reported and the others go on.
    """
    from fusion.cohort import check_id
    from fusion.run import start_run
    from fusion.wsi import TilingConfig
    from fusion.wsi.tissue import preset as tissue_preset

    try:
        overrides = dict(_parse_override(t) for t in tissue)
        config = TilingConfig(target_mpp=10.0 / magnification if magnification else target_mpp,
                              patch_size=patch_size, min_tissue=min_tissue, overlap=overlap,
                              tissue=tissue_preset(preset, **overrides))
        if tile_set:
            check_id(tile_set, "--set")
        # Check first, bind after, and both before Prefect starts (seconds): a mistyped path is one line.
        layout, c = start_run(out, cohort)
        if local:
            results = _tile_locally(layout, c, config, mpp, tile_set)
        else:
            from flows.progress import show_progress
            from flows.runners import dask_cluster, slide_task_runner
            from flows.server import prefect_api
            from flows.tiling import tile_cohort

            with prefect_api(), dask_cluster(dask_workers, dask_address) as address, show_progress(console):
                flow = tile_cohort.with_options(task_runner=slide_task_runner(workers, address))
                results = flow(str(cohort), str(out), config, mpp, tile_set)
    except (FusionError, ValueError) as e:
        _fail(e)
    _report(results, "tiles", strict)


def _parse_override(text: str) -> tuple[str, float | bool]:
    if "=" not in text:
        raise ValueError(f"--tissue takes NAME=VALUE, got '{text}'")
    name, value = text.split("=", 1)
    if value.lower() in ("true", "false"):
        return name.strip(), value.lower() == "true"
    try:
        return name.strip(), float(value)
    except ValueError:
        raise ValueError(f"--tissue {name}: '{value}' is not a number") from None


def _tile_locally(layout, c, config, mpp: float | None, tile_set: str) -> list[dict]:
    from fusion.stages import RETRY_DELAYS, fail_missing_slides, slide_rows, tile_one
    from fusion.wsi.qc import write_contact_sheet

    results = fail_missing_slides(layout, c, "tile", tile_set)
    with _progress() as progress:
        todo = [(sid, path) for sid, path in slide_rows(c) if sid not in c.missing_slides]
        for sid, path in progress.track(todo, description="tiling slides"):
            results.append(tile_one(layout, sid, path, config, mpp, tile_set, retry_delays=RETRY_DELAYS))
    write_contact_sheet(layout.tiles_dir(tile_set), results, c.slides)
    return results


@app.command()
def extract(
    run: Annotated[Path, typer.Argument(help="Run folder (after `fusion tile`).")],
    encoder: Annotated[list[str], typer.Option(help="Encoder name; repeat for several in one pass.")] = ["morph"],
    batch_size: Annotated[int, typer.Option(help="Tiles per batch.")] = 128,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes reading tiles.")] = 0,
    tile_set: Annotated[str, typer.Option("--set", help="Which tiling to encode (see `fusion tile --set`).")] = "",
    min_sharpness: Annotated[float | None, typer.Option(help="Drop out-of-focus tiles: Laplacian variance "
                                                        "below this (each file stores every tile's value).")] = None,
    stain_normalize: Annotated[bool, typer.Option(help="Macenko stain normalisation, estimated per slide.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit non-zero when any slide fails.")] = False,
) -> None:
    """Encode every tile with the chosen encoder(s) into RUN/features/<encoder>/<slide>.h5."""
    from fusion.features import ExtractConfig
    from fusion.run import clean_partials, open_run
    from fusion.stages import RETRY_DELAYS, build_encoders, extract_one, fail_missing_slides, slide_rows

    try:
        layout, c = open_run(run)
        clean_partials(layout)
        encoders = build_encoders(encoder, layout)
    except (FusionError, ValueError) as e:
        _fail(e)
    config = ExtractConfig(batch_size=batch_size, num_workers=workers, min_sharpness=min_sharpness,
                           stain_normalize=stain_normalize)
    results = fail_missing_slides(layout, c, "extract", tile_set)
    with _progress() as progress:
        todo = [(sid, path) for sid, path in slide_rows(c) if sid not in c.missing_slides]
        for sid, path in progress.track(todo, description="extracting features"):
            results.append(extract_one(layout, sid, path, encoders, config, tile_set, retry_delays=RETRY_DELAYS))
    _report(results, "tiles", strict)


@app.command()
def pretrain(
    run: Annotated[Path, typer.Argument(help="Run folder (after `fusion tile`).")],
    method: Annotated[str, typer.Option(help="dino or mocov3.")] = "mocov3",
    name: Annotated[str | None, typer.Option(help="Encoder name (default: the method).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the sampled tiles.")] = 15,
    tiles: Annotated[int, typer.Option(help="Tiles sampled from the run.")] = 4096,
    size: Annotated[int, typer.Option(help="Tile side fed to the network, pixels.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Tiles per step.")] = 128,
    depth: Annotated[int, typer.Option(help="ViT depth.")] = 4,
    dim: Annotated[int, typer.Option(help="ViT width.")] = 192,
) -> None:
    """Self-supervised pretraining (DINO or MoCo v3) of a small ViT on the run's own tiles.

    The encoder is saved in RUN/encoders/<name>/ and is then usable by name:
    `fusion extract RUN --encoder <name>`. Defaults finish in minutes on 2 CPU cores; on a GPU,
    raise --size, --tiles, --batch-size and --epochs.
    """
    from fusion.features.ssl import PretrainConfig
    from fusion.pretraining import pretrain_encoder
    from fusion.run import open_run

    try:
        config = PretrainConfig(method=method, epochs=epochs, tiles=tiles, size=size, batch_size=batch_size,
                                depth=depth, dim=dim)
        layout, c = open_run(run)
        with _progress() as progress:
            bar = _counter(progress, f"pretraining ({method})")
            result = pretrain_encoder(layout, c, config, name,
                                      on_epoch=lambda e, loss: bar(e + 1, epochs, f"{method} loss {loss:.3f}"))
    except (FusionError, ValueError) as e:
        _fail(e)
    what = "unchanged (same tiles and config): reused" if result["skipped"] else "saved"
    console.print(f"encoder {what} in [bold]{result['path']}[/]; use it with "
                  f"`fusion extract {run} --encoder {result['name']}`")


@app.command("import-features")
def import_features_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    source: Annotated[Path, typer.Option("--from", help="Folder of CLAM/TRIDENT <slide_id>.h5 feature files.")],
    encoder: Annotated[str, typer.Option(help="Name to file them under (e.g. uni, conch).")],
) -> None:
    """Import tile features computed by CLAM or TRIDENT (h5 with `features` and `coords`)."""
    from fusion.features.importing import import_features
    from fusion.run import open_run

    try:
        layout, c = open_run(run)
        result = import_features(layout, c, source, encoder)
    except (FusionError, ValueError) as e:
        _fail(e)
    console.print(f"imported {len(result['imported'])} slide(s) ({result['dim']}-D) as '{encoder}'; "
                  f"{len(result['missing'])} slide(s) had no file")


@app.command()
def train(
    run: Annotated[Path, typer.Argument(help="Run folder with features.")],
    model: Annotated[str, typer.Option(help="Model name (see `fusion doctor`).")] = "abmil",
    encoder: Annotated[str, typer.Option(help="Which features to train on.")] = "morph",
    folds: Annotated[int, typer.Option(help="Patient-level cross-validation folds.")] = 5,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping may end sooner).")] = 60,
    seed: Annotated[int, typer.Option(help="Seed: splits and initialisation.")] = 0,
    seeds: Annotated[int, typer.Option(help="Networks per fold, each with its own seed and early-stopping "
                                       "split, risks averaged (0: 5 under 500 patients, 3 under 2,000, else 1).")] = 0,
    tile_set: Annotated[str, typer.Option("--set", help="Which tiling's features to train on.")] = "",
    task: Annotated[str, typer.Option(help="survival (risk) or classification (the cohort's label).")] = "survival",
    loss: Annotated[str, typer.Option(help="Survival loss: auto, cox, efron, weighted_cox, nll (discrete time).")]
    = "auto",
    option: Annotated[list[str] | None, typer.Option(
        "--option", help="A model option NAME=VALUE, repeatable (e.g. biofusion's glca=0.1, "
        "modal_fusion=cls; `fusion doctor` lists each model's options).")] = None,
    extra_set: Annotated[list[str] | None, typer.Option(
        "--extra-set", help="Another tiling of the slides (e.g. a low magnification made with "
        "`fusion tile --set 5x`) that multi-scale models also read; repeatable.")] = None,
) -> None:
    """Cross-validate a model; writes RUN/models/<model>/fold-<k>/ and predictions."""
    from fusion.run import open_run
    from fusion.stages import evaluate_stage, train_stage
    from fusion.train.evaluate import format_evaluation
    from fusion.train.loop import TrainConfig

    try:
        config = TrainConfig(model=model, encoder=encoder, folds=folds, epochs=epochs, seed=seed, seeds=seeds,
                             tile_set=tile_set, task=task, loss=loss, model_options=_options(option or []),
                             extra_tile_sets=tuple(extra_set or ()))
        layout, c = open_run(run)
        with _progress() as progress:
            bar = _counter(progress, f"training {model} ({folds} folds)")
            summary = train_stage(layout, c, config, on_epoch=lambda fold, epoch, record: bar(
                fold * epochs + epoch + 1, folds * epochs))
            if bar.shown():  # early stopping ends folds sooner: the bar ends full
                bar(folds * epochs, folds * epochs)
        if summary.get("skipped"):
            console.print(f"{model}: up to date (same features, tables and config); not retrained")
        name = model if task == "survival" else f"{model}-classification"
        console.print(format_evaluation(evaluate_stage(layout, c, name)))
    except (FusionError, ValueError) as e:
        _fail(e)


def _options(pairs: list[str]) -> dict:
    """NAME=VALUE pairs -> {name: value}, values read as YAML scalars (0.1, true, cls)."""
    import yaml

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--option {pair!r}: expected NAME=VALUE, e.g. glca=0.1")
        out[name.strip()] = yaml.safe_load(value)
    return out


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder with a trained model.")],
    model: Annotated[str, typer.Option(help="Model folder name under RUN/models (e.g. abmil, "
                                       "acmil-classification).")] = "abmil",
) -> None:
    """Per fold: C-index (scikit-survival) and the oracle C-index on synthetic data, or AUC and
    balanced accuracy for a classifier; mean ± sd over folds."""
    from fusion.run import open_run
    from fusion.stages import evaluate_stage
    from fusion.train.evaluate import format_evaluation

    try:
        layout, c = open_run(run)
        result = evaluate_stage(layout, c, model)
    except (FusionError, ValueError) as e:
        _fail(e)
    if result.get("task") == "classification":
        table = Table("fold", "patients", "AUC", "balanced accuracy")
        for f in result["folds"]:
            table.add_row(str(f["fold"]), str(f["n"]), f"{f['auc']:.3f}", f"{f['balanced_accuracy']:.3f}")
        console.print(table)
        console.print(format_evaluation(result))
        return
    table = Table("fold", "patients", "events", "C-index", *(["oracle"] if "oracle_c_index_mean" in result else []))
    for f in result["folds"]:
        extra = [f"{f['oracle_c_index']:.3f}"] if "oracle_c_index" in f else []
        table.add_row(str(f["fold"]), str(f["n"]), str(f["events"]), f"{f['c_index']:.3f}", *extra)
    console.print(table)
    console.print(format_evaluation(result))


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder holding the patients to score (features extracted).")],
    model_dir: Annotated[Path, typer.Option(help="A trained model folder, e.g. OTHER_RUN/models/biofusion.")],
    out: Annotated[Path | None, typer.Option(help="Output parquet (default RUN/predictions/<model>.parquet).")] = None,
) -> None:
    """Score patients with a trained model (mean of its fold checkpoints); checkpoints are verified by hash."""
    from fusion.run import open_run
    from fusion.train.predict import predict_patients

    try:
        layout, c = open_run(run)
        target = out or layout.root / "predictions" / f"{model_dir.name}.parquet"
        with _progress() as progress:
            table = predict_patients(model_dir, layout, c, target,
                                     on_fold=_counter(progress, f"scoring with {model_dir.name}: folds"))
    except (FusionError, ValueError) as e:
        _fail(e)
    console.print(f"{len(table)} patient(s) scored with {model_dir.name} ({table.folds.iat[0]} folds) -> {target}")
    from fusion.scoring import trained_on

    seen = trained_on(model_dir, table.patient_id)
    if seen:
        err.print(f"[yellow]warning:[/] {len(seen)} of these patient id(s) are patients the model was trained on "
                  f"({escape(', '.join(seen[:5]))}{', ...' if len(seen) > 5 else ''}): if they are the same patients, "
                  "their scores are optimistic; if not, give new patients ids of their own", highlight=False)


@app.command()
def compare(
    run: Annotated[Path, typer.Argument(help="Run folder with trained models.")],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
) -> None:
    """Every model and baseline of RUN on the run's folds: fold-mean C-index with its 95% CI, the pooled
    C on the training-fold scale, % of the oracle above chance, and each model's paired difference to
    the best (per-fold mean ± sd, paired bootstrap 95% CI)."""
    from fusion.run import open_run
    from fusion.train.evaluate import compare_classifiers, compare_models

    try:
        layout, c = open_run(run)
        table = compare_models(layout.root / "models", c, layout.analysis, n_boot=bootstrap)
        classifiers = compare_classifiers(layout.root / "models", c, layout.analysis)
    except (FusionError, ValueError) as e:
        _fail(e)
    if not len(table) and not len(classifiers):
        _fail(ValueError(f"no trained model in {layout.root / 'models'}; run `fusion train` first"))
    if len(table):
        console.print(comparison_table(table))
        console.print("C: Harrell's C per test fold, mean ± sd [95% CI, patients resampled within folds]; pooled: "
                      "all patients on the training-fold percentile scale. Δ: paired difference to the best model "
                      "on the patients both scored.")
        console.print(f"written to {layout.analysis / 'comparison.csv'}")
    if len(classifiers):  # the cohort's label: ACMIL beside ABMIL
        out = Table("classifier", "AUC (mean ± sd)", "balanced accuracy")
        for r in classifiers.itertuples():
            out.add_row(r.model, f"{r.auc_mean:.3f} ± {r.auc_sd:.3f}", f"{r.balanced_accuracy_mean:.3f}")
        console.print(out)
        console.print(f"written to {layout.analysis / 'classification.csv'}")


def comparison_table(table) -> Table:
    """The `fusion compare` survival table as a rich Table."""
    has_oracle = table["fraction_of_oracle"].notna().any()
    out = Table("model", "C-index mean ± sd [95% CI]", "pooled C", "Δ vs best [95% CI]",
                *(["% of oracle"] if has_oracle else []))
    for i, r in enumerate(table.itertuples()):
        delta = "best" if i == 0 else (f"{-r.diff_vs_best_mean:+.3f} ± {r.diff_vs_best_sd:.3f} "
                                       f"[{-r.diff_vs_best_ci_high:+.3f}, {-r.diff_vs_best_ci_low:+.3f}]")
        oracle = [] if not has_oracle else [_num(100 * r.fraction_of_oracle if r.fraction_of_oracle is not None
                                                 else None, "{:.0f}%")]
        out.add_row(r.model, f"{r.c_index_mean:.3f} ± {r.c_index_sd:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]",
                    _num(r.pooled_c_index), delta, *oracle)
    return out


@app.command()
def folds(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    k: Annotated[int, typer.Option("--folds", help="Number of folds (for a new table).")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the assignment (for a new table).")] = 0,
    rebuild: Annotated[bool, typer.Option(help="Replace the run's table (every model then retrains).")] = False,
) -> None:
    """Show (or make) the run's fold table: which fold each patient is tested in, for every model."""
    from fusion.run import open_run
    from fusion.train.folds import FOLDS_CSV, ensure_fold_table, read_fold_table

    try:
        layout, c = open_run(run)
        table = read_fold_table(layout.root)
        if table is None or rebuild:
            table = ensure_fold_table(layout.root, c, k, seed, rebuild=rebuild)
    except (FusionError, ValueError) as e:
        _fail(e)
    sizes = table.fold.value_counts().sort_index()
    console.print(f"{layout.root / FOLDS_CSV}: {len(table.fold)} patients in {table.k} folds "
                  f"({', '.join(str(int(n)) for n in sizes)}), seed {table.seed}, stratified by {table.stratify}; "
                  f"fingerprint {table.fingerprint}")


@app.command()
def analyze(
    run: Annotated[Path, typer.Argument(help="Run folder with trained models.")],
    model: Annotated[list[str] | None, typer.Option(help="Only these models (repeatable); default: all.")] = None,
    groups: Annotated[str, typer.Option(help="Risk groups: median or tertiles (cut on the training folds).")]
    = "median",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Cohort statistics of every model and baseline: C-indices with CIs, td-AUC, IBS, calibration,
    Kaplan-Meier by risk group, Cox hazard ratios; writes RUN/analysis/ and its HTML report."""
    from fusion.report.analysis import analyze_run
    from fusion.run import open_run

    try:
        layout, c = open_run(run)
        with _progress() as progress:
            result = analyze_run(layout, c, model or None, groups, bootstrap, seed,
                                 on_model=_counter(progress, "analysing models"))
    except (FusionError, ValueError, FileNotFoundError) as e:
        _fail(e)
    table = Table("model", "Harrell's C fold mean [95% CI]", "pooled C", "Uno's C [95% CI]", "td-AUC", "IBS",
                  "log-rank p", "HR high/low")
    for r in result["summary"]:
        if r["task"] != "survival":
            continue
        hr = "" if r.get("hr_high") is None else f"{r['hr_high']:.2f} [{r['hr_low_ci']:.2f}, {r['hr_high_ci']:.2f}]"
        uno = "" if r.get("uno_c") is None else f"{r['uno_c']:.3f} [{_num(r['uno_c_low'])}, {_num(r['uno_c_high'])}]"
        table.add_row(r["model"], f"{r['harrell_c']:.3f} [{r['harrell_c_low']:.3f}, {r['harrell_c_high']:.3f}]",
                      _num(r.get("harrell_c_pooled")), uno, _num(r.get("td_auc_mean")), _num(r.get("ibs")),
                      _num(r.get("logrank_p"), "{:.2g}"), hr)
    console.print(table)
    for r in result["summary"]:
        if r["task"] == "classification":
            console.print(f"{r['model']}: AUC {r['auc']:.3f} [{r['auc_low']:.3f}, {r['auc_high']:.3f}], "
                          f"balanced accuracy {r['balanced_accuracy']:.3f}, F1 {r['f1']:.3f}")
    console.print(f"cohort report: {result['report']}")


def _num(value, fmt: str = "{:.3f}") -> str:
    return "" if value is None or value != value else fmt.format(value)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run folder holding the patients (features extracted).")],
    model: Annotated[str, typer.Option(help="Survival model of this run, or a model folder of another run.")]
    = "biofusion",
    patient: Annotated[list[str] | None, typer.Option(help="Patient id (repeatable).")] = None,
    all_patients: Annotated[bool, typer.Option("--all", help="A report for every patient of the cohort.")] = False,
    pdf: Annotated[bool, typer.Option(help="Also print each report to PDF (headless Chromium).")] = True,
    groups: Annotated[str, typer.Option(help="Risk groups: median or tertiles.")] = "median",
    horizon: Annotated[list[float] | None, typer.Option(help="Horizon for the absolute risk, in the cohort's time "
                                                        "unit (repeatable; default 1, 3 and 5 years within the "
                                                        "training follow-up).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/reports).")] = None,
    sign: Annotated[str | None, typer.Option(help="Sign the patients' existing draft reports as this reviewer "
                                             "(writes <id>.v<n>.signed.html and logs it in audit.jsonl).")] = None,
    role: Annotated[str, typer.Option(help="The reviewer's role (with --sign).")] = "",
    decision: Annotated[str, typer.Option(help="agree, agree with comment, disagree or not assessable "
                                          "(with --sign).")] = "agree",
    comment: Annotated[str, typer.Option(help="The reviewer's comment (with --sign).")] = "",
) -> None:
    """Clinician reports: one self-contained HTML page (+ PDF) per patient; or, with --sign, a signed copy."""
    import itertools

    from fusion.run import open_run

    if not patient and not all_patients:
        _fail(ValueError("name patients with --patient ID (repeatable) or use --all"))
    try:
        layout, c = open_run(run)
        ids = list(c.patients["patient_id"]) if all_patients else list(patient)
        if sign is not None:
            from fusion.report.signing import sign_report

            signed = [sign_report(out or layout.reports, pid, sign, role, decision, comment, pdf=pdf) for pid in ids]
            console.print(f"{len(signed)} report(s) signed by {sign}: " + ", ".join(p.name for p in signed))
            return
        from fusion.report.patient import write_reports

        with _progress() as progress:
            bar, done = _counter(progress, f"writing {len(ids)} report(s)"), itertools.count(1)
            written = write_reports(layout, c, model, None if all_patients else ids, out, pdf=pdf, groups=groups,
                                    on_report=lambda _: bar(next(done), len(ids)),
                                    horizons=horizon or None)
    except (FusionError, ValueError, FileNotFoundError) as e:
        _fail(e)
    html = [p for p in written if p.suffix == ".html"]
    console.print(f"{len(html)} report(s) -> {html[0].parent if html else out}"
                  + (f" (+ {len(written) - len(html)} PDF)" if pdf else ""))
    asked = len(c.patients) if ids is None else len(ids)
    if len(html) < asked:  # each failure is in the ledger with its reason; the other reports were written
        err.print(f"[yellow]{asked - len(html)} report(s) failed[/] (reasons in {layout.root / 'ledger.jsonl'})",
                  highlight=False)


@app.command("run")
def run_pipeline(
    cohort: Annotated[Path, typer.Argument(help="Cohort folder.")],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    model: Annotated[str, typer.Option(help="Model to train.")] = "abmil",
    encoder: Annotated[str, typer.Option(help="Tile encoder.")] = "morph",
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 60,
    target_mpp: Annotated[float, typer.Option(help="Tile resolution in um/px.")] = 0.5,
    patch_size: Annotated[int, typer.Option(help="Tile size in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    strict: Annotated[bool, typer.Option(help="Exit non-zero when any slide fails.")] = False,
    workers: Annotated[int, typer.Option(help="Slides processed at once (threads).")] = 2,
    dask_address: Annotated[str | None, typer.Option(help="Run the per-slide tasks on this Dask scheduler "
                                                     "(tcp://host:8786).")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="Run the per-slide tasks on a local Dask cluster "
                                                     "of this many processes.")] = None,
) -> None:
    """Run every stage as one Prefect flow (embedded local server unless PREFECT_API_URL is set).

    For several models, the cohort analysis and patient reports, use `fusion pipeline CONFIG.yaml`.
    """
    from fusion.preflight import check_encoders
    from fusion.run import start_run
    from fusion.train.loop import TrainConfig
    from fusion.wsi import TilingConfig

    try:
        # Everything that can be checked is checked before Prefect starts; the run is bound last.
        tiling = TilingConfig(target_mpp=target_mpp, patch_size=patch_size)
        train = TrainConfig(model=model, encoder=encoder, folds=folds, epochs=epochs, seed=seed)
        check_encoders(encoder.split("+"))
        start_run(out, cohort)
        from flows.pipeline import pipeline
        from flows.progress import show_progress
        from flows.runners import dask_cluster
        from flows.server import prefect_api

        with prefect_api(), dask_cluster(dask_workers, dask_address) as address, show_progress(console):
            summary = pipeline(str(cohort), str(out), tiling=tiling, train=train, workers=workers,
                               dask_address=address)
    except (FusionError, ValueError) as e:
        _fail(e)
    ev = summary["evaluation"]
    console.print(f"\nrun folder: [bold]{summary['run']}[/]  ({summary['slides']} slides, {summary['tiles']} tiles)")
    if summary["failed"]:
        console.print(f"[yellow]{len(summary['failed'])} slide(s) failed[/]: "
                      + ", ".join(f["slide_id"] for f in summary["failed"]) + " (see RUN/ledger.jsonl)")
    console.print(f"model C-index  {ev['c_index_mean']:.3f} ± {ev['c_index_sd']:.3f}  ({model}, {folds}-fold CV)")
    if "oracle_c_index_mean" in ev:
        console.print(f"oracle C-index {ev['oracle_c_index_mean']:.3f} ± {ev['oracle_c_index_sd']:.3f}"
                      "  (true risk, same folds)")
    if strict and summary["failed"]:
        raise typer.Exit(1)


@app.command("pipeline")
def pipeline_cmd(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML); see configs/demo.yaml.")],
    dask_address: Annotated[str | None, typer.Option(help="Run the per-slide tasks on this Dask scheduler "
                                                     "(tcp://host:8786); overrides the config.")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="Run the per-slide tasks on a local Dask cluster "
                                                     "of this many processes; overrides the config.")] = None,
    strict: Annotated[bool, typer.Option(help="Exit non-zero when any slide fails.")] = False,
) -> None:
    """Every stage of CONFIG as one Prefect flow: tile, extract, train, analyze, report.

    Each stage redoes only what is stale (hashes of its inputs and parameters are stored beside
    its outputs): after one slide is added, that slide is tiled and encoded and the models retrain;
    with nothing changed, nothing is recomputed.
    """
    from fusion.pipeline_config import load_pipeline_config
    from fusion.preflight import check_pipeline

    try:
        cfg = load_pipeline_config(config, dask_address=dask_address, dask_workers=dask_workers)
        check_pipeline(cfg)  # the cohort, encoders, models and patients it names; then the run is bound
        from flows.pipeline import pipeline_from_config
        from flows.progress import show_progress
        from flows.server import prefect_api

        with prefect_api(), show_progress(console):
            summary = pipeline_from_config(cfg)
    except (FusionError, ValueError) as e:
        _fail(e)
    _print_summary(summary)
    if (strict or cfg.strict) and summary["failed"]:
        raise typer.Exit(1)


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="Pipeline config with a `serve:` section (inbox, workdir, model).")],
    cron: Annotated[str, typer.Option(help="When to score, as a cron expression (server time zone: UTC).")]
    = "0 2 * * *",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly-scoring",
    once: Annotated[bool, typer.Option(help="Score the inbox now, once, without serving a deployment.")] = False,
    work_pool: Annotated[str | None, typer.Option(help="Register the deployment on this Prefect work pool and "
                                                  "return (its workers run it) instead of serving here.")] = None,
) -> None:
    """Serve a Prefect deployment that scores new patients dropped into the inbox on a schedule.

    Each run takes the inbox's new slides and patient rows into SERVE.workdir/cohort, tiles and
    encodes them, scores them with the trained model's fold ensemble (predictions in
    SERVE.workdir/run/predictions/<model>.parquet), writes their reports and empties the inbox of
    them. Schedules need a Prefect server (`prefect server start`, PREFECT_API_URL set); the
    process serves until stopped with Ctrl-C. `--once` runs one scoring now, on any Prefect setup.
    """
    from fusion.pipeline_config import load_pipeline_config
    from fusion.preflight import check_serve

    try:
        check_serve(load_pipeline_config(config), config)  # a missing inbox or model: one line, before Prefect
        from flows.progress import show_progress
        from flows.scoring import score_inbox, serve_scoring
        from flows.server import prefect_api

        if once:
            with prefect_api(), show_progress(console):
                result = score_inbox(str(config.resolve()))
            _print_scoring(result)
            return
        if work_pool:
            serve_scoring(config, cron, name, work_pool)
            console.print(f"deployment [bold]fusion-score-inbox/{name}[/] registered on work pool '{work_pool}' "
                          f"(cron '{cron}'); start a worker: prefect worker start --pool {work_pool}")
            return
        console.print(f"serving deployment [bold]fusion-score-inbox/{name}[/] on cron '{cron}' (Ctrl-C stops)")
        serve_scoring(config, cron, name)
    except (FusionError, ValueError) as e:
        _fail(e)


@app.command()
def ui(
    root: Annotated[list[Path], typer.Option(help="Serve the run folders under this folder (repeatable; "
                                             "default: the current folder).")] = [],
    port: Annotated[int, typer.Option(help="Port of Prefect's UI and API.")] = 4200,
    files_port: Annotated[int, typer.Option(help="Port of the file server that opens the reports linked "
                                            "from the UI (pipelines link to 4201 unless FUSION_FILES_URL "
                                            "says otherwise).")] = 4201,
) -> None:
    """Prefect's UI (runs, logs, artifacts) and a file server that opens the reports the artifacts link to.

    Starts `prefect server start` on 127.0.0.1:PORT (its database in $PREFECT_HOME; `make ui` uses
    the repository's .prefect/, where `make demo` records its runs), or uses a Prefect server already
    answering there, and serves the files of run folders on 127.0.0.1:FILES_PORT. Runs report to
    the UI as they happen when the terminal running them has PREFECT_API_URL set (printed below).
    Ctrl-C stops both servers.
    """
    import signal
    import time

    from fusion.ui import (
        FILES_URL_ENV,
        HOST,
        files_url,
        prefect_healthy,
        serve_files,
        start_prefect_server,
        stop,
        wait_for_prefect,
    )

    api = f"http://{HOST}:{port}/api"
    server = prefect = None
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started where SIGINT is ignored
    signal.signal(signal.SIGTERM, _interrupt)  # and `kill`: both stop both servers
    try:
        server = serve_files(root or [Path.cwd()], files_port)
        if prefect_healthy(api):
            console.print(f"a Prefect server already answers on {HOST}:{port}; using it")
        else:
            prefect = start_prefect_server(port)
            with console.status(f"starting Prefect's server on {HOST}:{port} (15-60 s)"):
                wait_for_prefect(api, prefect)
        files = f"http://{HOST}:{files_port}"
        console.print(f"\nPrefect UI    [bold]http://{HOST}:{port}[/]  (runs, logs; each run's artifacts link "
                      "its reports)")
        console.print(f"report files  [bold]{files}[/]  (run folders under "
                      f"{', '.join(str(p.resolve()) for p in root or [Path.cwd()])})")
        console.print(f"\nIn the terminal that runs pipelines, so that their runs appear here as they happen:\n"
                      f"  export PREFECT_API_URL={api}")
        if files != files_url():
            console.print(f"  export {FILES_URL_ENV}={files}")
        console.print("Ctrl-C stops both servers.")
        while prefect is None or prefect.poll() is None:
            time.sleep(1)
        raise FusionError(f"Prefect's server exited with code {prefect.returncode}")
    except KeyboardInterrupt:
        console.print("stopping")
    except FusionError as e:
        _fail(e)
    finally:
        if server is not None:
            server.stop()
        if prefect is not None:
            stop(prefect)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _print_scoring(result: dict) -> None:
    """What one scoring of the inbox did: every patient scored, refused or failed, and each warning."""
    console.print(f"{len(result['patients'])} patient(s) scored"
                  + (f" into {result['predictions']}" if result["patients"] else ""))
    for pid, why in sorted(result.get("warnings", {}).items()):
        err.print(f"[yellow]warning[/] {escape(pid)}: {escape(why)}", highlight=False)
    for pid, why in sorted(result["failed_patients"].items()):
        what = "refused" if pid in result.get("scored_before", {}) else "failed"
        err.print(f"[yellow]{what}[/] {escape(pid)}: {escape(why)} (moved to the inbox's failed/{result['batch']}/)",
                  highlight=False)


def _print_summary(summary: dict) -> None:
    done, skipped = summary["slides_done"], summary["slides_skipped"]
    console.print(f"\nrun folder: [bold]{summary['run']}[/]  ({summary['slides']} slides, {summary['tiles']} tiles; "
                  f"tiled now {done['tile']}, encoded now {done['extract']}, "
                  f"up to date {skipped['tile']}/{skipped['extract']})")
    if summary["failed"]:
        console.print(f"[yellow]{len(summary['failed'])} slide(s) failed[/]: "
                      + ", ".join(f["slide_id"] for f in summary["failed"]) + " (see RUN/ledger.jsonl)")
    retrained = [m["model"] for m in summary["models"] if m["retrained"]]
    unchanged = [m["model"] for m in summary["models"] if not m["retrained"]]
    console.print(f"trained now: {', '.join(retrained) or 'none'}"
                  + (f"; up to date: {', '.join(unchanged)}" if unchanged else ""))
    _print_comparison(Path(summary["run"]), summary["models"])
    run = Path(summary["run"])
    console.print("\n[bold]where to look[/]")
    if summary.get("analysis"):
        report = Path(summary["analysis"]) / "report.html"
        console.print(f"  cohort analysis   {report if report.exists() else summary['analysis']}")
    if summary.get("reports"):
        console.print(f"  patient reports   {Path(summary['reports'][0]).parent} ({len(summary['reports'])}, "
                      "from the best network)")
    if (run / "tiles" / "qc.html").exists():
        console.print(f"  tiling QC         {run / 'tiles' / 'qc.html'}")
    console.print(f"  every model       fusion compare {run}")
    console.print("  runs and logs     fusion ui (Prefect's UI; run artifacts link the reports)")


def _print_comparison(run: Path, models: list[dict]) -> None:
    """The `fusion compare` table of a finished run (C with its CI beside the oracle, paired Δ to the
    best); the plain per-model scores when the comparison cannot be made (e.g. classifiers only)."""
    from fusion.run import open_run
    from fusion.train.evaluate import compare_models

    try:
        layout, cohort = open_run(run)
        table = compare_models(layout.root / "models", cohort, layout.analysis, n_boot=1000)
    except (FusionError, ValueError):
        table = None
    if table is not None and len(table):
        console.print(comparison_table(table))
        oracle = table["oracle_c_index_mean"].dropna()
        if len(oracle):
            console.print(f"oracle (the true risk of the synthetic cohort, same folds): C {oracle.iloc[0]:.3f}")
        console.print("C: Harrell's C per test fold, mean ± sd [95% CI]; pooled: all patients on the training-fold "
                      "percentile scale; Δ: paired difference to the best model; % of oracle: (C - 0.5) / "
                      "(C of the true risk - 0.5).")
        return
    out = Table("model", "score (mean ± sd over folds)", "oracle")
    for m in models:
        ev = m["evaluation"]
        metric = "auc" if ev.get("task") == "classification" else "c_index"
        oracle = ev.get("oracle_c_index_mean")
        out.add_row(m["model"], f"{metric} {ev[f'{metric}_mean']:.3f} ± {ev[f'{metric}_sd']:.3f}",
                    "" if oracle is None else f"{oracle:.3f}")
    console.print(out)


@app.command()
def doctor(
    config: Annotated[Path | None, typer.Argument(help="Also check what this pipeline config needs: its cohort, "
                                                  "models, encoders' weights and room for its run.")] = None,
) -> None:
    """Check everything a run needs by doing it once; list every model, baseline and encoder.

    Python, openslide (reads a tiled TIFF), torch and CUDA, Chromium (started headless, prints a PDF),
    Prefect (the server pipelines will use answers, or the embedded one starts), the working folder
    and its free space. Exits 1 when a check fails.
    """
    from fusion.doctor import config_checks, encoder_rows, environment_checks, model_rows

    cfg = None
    with console.status("checking (Chromium and Prefect's server start once: up to a minute)"):
        if config is not None:
            from fusion.pipeline_config import load_pipeline_config

            try:
                cfg = load_pipeline_config(config)
            except (FusionError, ValueError) as e:
                _fail(e)
        checks = environment_checks(Path.cwd(), pdf_needed=bool(cfg and cfg.report.enabled and cfg.report.pdf))
        checks.append(_check_prefect())
        if cfg is not None:
            checks += config_checks(cfg)
    colour = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table("check", "status", "detail", title="fusion doctor")
    for c in checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail)
    console.print(table)
    trained = {m.model for m in cfg.models} if cfg else set()
    models = Table("model", "kind", "reads", *(["in config"] if cfg else []), title="models and baselines")
    for name, kind, reads in model_rows():
        models.add_row(name, kind, reads, *(["yes" if name in trained else ""] if cfg else []))
    console.print(models)
    encoders = Table("encoder", "needs", title="encoders")
    for name, needs in encoder_rows(cfg.run if cfg else None):
        encoders.add_row(name, needs)
    console.print(encoders)
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        err.print(f"[bold red]{len(failed)} check(s) failed:[/] {', '.join(failed)}")
        raise typer.Exit(1)


def _check_prefect():
    """The Prefect API pipelines will use: the server PREFECT_API_URL names answers, or the embedded one starts
    (here, not in fusion.doctor: only the CLI imports Prefect)."""
    import time

    from fusion.doctor import Check

    try:
        import prefect
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME

        from fusion.ui import prefect_healthy

        url = PREFECT_API_URL.value()
        if url:
            if prefect_healthy(url, timeout=10):
                return Check("prefect", "ok", f"{prefect.__version__}; the server at PREFECT_API_URL={url} answers")
            return Check("prefect", "fail", f"{prefect.__version__}; nothing answers at PREFECT_API_URL={url}: "
                                            "start it (`fusion ui`) or unset PREFECT_API_URL")
        from prefect.server.api.server import SubprocessASGIServer

        start = time.perf_counter()
        server = SubprocessASGIServer()
        try:
            server.start(timeout=300)
        finally:
            server.stop()
        return Check("prefect", "ok", f"{prefect.__version__}; the embedded server started in "
                                      f"{time.perf_counter() - start:.0f} s (database in {PREFECT_HOME.value()})")
    except Exception as e:  # noqa: BLE001 - the doctor reports, it never crashes
        return Check("prefect", "fail", f"{type(e).__name__}: {e}")


def _report(results: list[dict], unit: str, strict: bool = False) -> None:
    failed = [r for r in results if r["status"] == "failed"]
    done = sum(r["status"] == "done" for r in results)
    skipped = sum(r["status"] == "skipped" for r in results)
    n = sum(r.get("n_tiles") or 0 for r in results)
    console.print(f"{done} done, {skipped} already up to date, {len(failed)} failed; {n} {unit}")
    for r in failed:
        err.print(f"[red]failed[/] {escape(r['slide_id'])}: {escape(r['error'])}", highlight=False)
    if failed and (strict or len(failed) == len(results)):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

