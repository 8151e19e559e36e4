"""`wmctl train`: the shortcut-forcing dynamics (or the teacher-forced baseline) on a token store."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.base import given_options, split_list
from pipeline.cli.progress import progress
from trainer.config import TrainConfig, train_config
from trainer.loop import Preempted, run_train
from trainer.runs import saved_config

log = logging.getLogger("wmctl")


def train(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option(help="Token store.")] = Path("tokens.zarr"),
    preset: Annotated[str, typer.Option(help="tiny (tests) | small (CPU minutes) | base (GPU) | dinowm (the "
                                             "DINO-WM baseline for --model teacher-forced).")] = "small",
    model: Annotated[str | None, typer.Option(help="shortcut | teacher-forced (the DINO-WM-style baseline) | "
                                              "deterministic (the shortcut backbone without noise: the control). "
                                              "Default: the preset's.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: a new one under runs/).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue --out from its newest complete checkpoint.")] = False,
    init_from: Annotated[Path | None, typer.Option(help="Fine-tune from this run/checkpoint (EMA weights).")] = None,
    steps: Annotated[int | None, typer.Option(help="Total optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows per rank per micro-step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda.")] = None,
    sources: Annotated[str | None, typer.Option(help="Comma-separated store sources (default all).")] = None,
    fps: Annotated[float | None, typer.Option(help="The model's rate: frameskip = the sources' stored fps / FPS "
                                              "(integral, else refused with the rates they can serve).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    tracker: Annotated[str | None, typer.Option(help="none | tensorboard (default: <run>/tensorboard) | wandb | "
                                                "trackio (optional extras); metrics.jsonl is always written.")]
    = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config field: key=value or "
                                                  "model.key=value (repeatable).")] = None,
) -> None:
    """Train the shortcut-forcing dynamics (or a baseline: teacher-forced, deterministic) on a token store."""
    base = saved_config(out) if resume and out is not None else None  # --resume: the run's own config and store
    given = given_options(ctx)

    def flag(name: str, value):  # resuming, a flag counts only where given (and must then agree with the run)
        return value if base is None or name in given else None

    cfg = train_config(flag("preset", preset), kind=flag("model", model), overrides=set_ or [], base=base,
                       store=flag("store", store), out=out, init_from=init_from, steps=steps, batch_size=batch_size,
                       lr=lr, device=device, seed=seed, tracker=tracker, fps=fps,
                       sources=split_list(sources))
    try:
        with _step_logger(cfg) as on_step:
            result = run_train(cfg, resume=resume, on_step=on_step)
    except Preempted as e:
        typer.secho(str(e), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(3) from None
    final = result.metrics[-1] if result.metrics else {}
    summary = ", ".join(f"{k} {final[k]:.4g}" for k in ("loss", "val_loss", "val_pred_mse", "val_copy_mse")
                        if k in final)
    typer.echo(f"run {result.run_dir}: step {result.step}, checkpoint {result.last_checkpoint}; {summary}")


@contextmanager
def _step_logger(cfg: TrainConfig):
    """A progress bar of steps, and a log line every `log_every` steps and at validation."""
    with progress("train", total=cfg.steps, unit="steps", every_s=1e9) as advance:
        last = {"step": 0}

        def on_step(row: dict) -> None:
            advance(row["step"] - last["step"], loss=f"{row['loss']:.4f}")
            last["step"] = row["step"]
            if row["step"] % cfg.log_every == 0 or "val_loss" in row:
                log.info("step %d  " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                 if k != "step" and isinstance(v, float)), row["step"])

        yield on_step
