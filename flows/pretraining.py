"""Self-supervised pretraining as a Prefect flow: one task per encoder of the config's `pretrain:`
section, each skipped when its folder records the same tiles and config (fusion.pretraining)."""

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.progress import bar
from fusion.run import open_run


@task(name="pretrain", task_run_name="pretrain-{name}", cache_policy=NO_CACHE)
def pretrain_task(run: str, config, name: str) -> dict:
    from fusion.pretraining import pretrain_encoder

    layout, cohort = open_run(run)
    epochs = bar(f"pretraining {name} ({config.method})", total=config.epochs)
    result = pretrain_encoder(layout, cohort, config, name,
                              on_epoch=lambda e, loss: epochs.update(completed=e + 1,
                                                                     description=f"{name} loss {loss:.3f}"))
    if result["skipped"]:
        get_run_logger().info("%s: tiles and config unchanged since its pretraining; reused", name)
    return result


@flow(name="fusion-pretrain")
def pretrain_encoders(run: str, sections: list) -> list[dict]:
    """Pretrain each encoder in turn (they share the CPU/GPU)."""
    return [pretrain_task(run, s.build(), s.encoder) for s in sections]
