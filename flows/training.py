"""Training and evaluation as a Prefect flow: one task per model, each skipped when the model
folder records the same training inputs (features, patient tables, config)."""

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.progress import bar
from fusion.run import open_run
from fusion.stages import evaluate_stage, train_stage
from fusion.train.baselines import BASELINES
from fusion.train.loop import TrainConfig


@task(name="train", task_run_name="train-{config.model}-{config.task}", cache_policy=NO_CACHE)
def train_task(run: str, config: TrainConfig) -> dict:
    layout, cohort = open_run(run)
    logger = get_run_logger()
    epochs = bar(f"training {config.model} ({config.folds} folds x <= {config.epochs} epochs)",
                 total=0 if config.model in BASELINES else config.folds * config.epochs)  # baselines: no epochs

    def on_epoch(fold: int, epoch: int, record: dict) -> None:
        epochs.update(completed=fold * config.epochs + epoch + 1)
        if epoch % 10 == 0:
            score = record.get("val_c_index", record.get("val_auc", float("nan")))
            logger.info("%s fold %d epoch %d: train loss %.3f, validation %.3f", config.model, fold, epoch,
                        record["train_loss"], score)

    summary = train_stage(layout, cohort, config, on_epoch=on_epoch)
    if epochs.shown:  # early stopping ends folds sooner: the bar ends full
        epochs.update(completed=config.folds * config.epochs)
    if summary.get("skipped"):
        logger.info("%s: features, tables and config unchanged since the last training; not retrained",
                    config.model)
    return summary


@task(name="evaluate", task_run_name="evaluate-{model}", cache_policy=NO_CACHE)
def evaluate_task(run: str, model: str) -> dict:
    layout, cohort = open_run(run)
    return evaluate_stage(layout, cohort, model)


@flow(name="fusion-train")
def train_models(run: str, configs: list[TrainConfig]) -> list[dict]:
    """Cross-validate each model in turn (they share the CPU/GPU) and evaluate it; one dict per model
    with its folder name, whether it was retrained, the CV summary and the evaluation."""
    out = []
    for config in configs:
        folder = config.model if config.task == "survival" else f"{config.model}-classification"
        summary = train_task(run, config)
        out.append({"model": folder, "skipped": bool(summary.get("skipped")), "summary": summary,
                    "evaluation": evaluate_task(run, folder)})
    return out
