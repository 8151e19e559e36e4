"""The trainer stage's commands: `wmctl train` (the shortcut-forcing dynamics, or a baseline, on a token store),
`eval` and `visualize` (how far the model can be trusted, and looking at it), the `decoder` group (train), `bench
rollout` and `bench train`. Mounted by name from `pipeline.cli.table`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from featurestore.decoder import DecoderConfig, run_decoder_train
from pipeline.cli.base import (
    AutoDevice,
    Sets,
    console,
    given_options,
    hxw,
    int_list,
    new_app,
    print_result,
    split_list,
)
from pipeline.cli.progress import progress
from pipeline.machine import DEVICE_HELP, resolve_device
from pipeline.overrides import apply_set
from trainer.bench import bench_rollout, bench_train
from trainer.config import TrainConfig, train_config
from trainer.eval import EvalConfig, eval_tables, run_eval
from trainer.loop import Preempted, run_train
from trainer.proposal import ProposalConfig
from trainer.runs import new_decoder_dir, resolve_run, saved_config
from trainer.visualize import VisualizeConfig, run_visualize

log = logging.getLogger("wmctl")  # the step lines of `wmctl train` log under "wmctl" (not this module's name)

# the W&B run of `--tracker wandb` (recorded in the run's config: its evals log there too; may change on resume)
WandbProject = Annotated[str | None, typer.Option(help="W&B project (default wmctl; resuming, the run's).")]
WandbEntity = Annotated[str | None, typer.Option(help="W&B entity: a team or user (default: your W&B default).")]
WandbTags = Annotated[str | None, typer.Option(help="W&B tags, comma-separated (replace the run's).")]


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
    device: Annotated[str | None, typer.Option(help=f"{DEVICE_HELP[:-1]} (default auto; resuming, the run's).")]
    = None,
    sources: Annotated[str | None, typer.Option(help="Comma-separated store sources (default all).")] = None,
    fps: Annotated[float | None, typer.Option(help="The model's rate: frameskip = the sources' stored fps / FPS "
                                              "(integral, else refused with the rates they can serve).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    tracker: Annotated[str | None, typer.Option(help="none | tensorboard (default: <run>/tensorboard) | wandb | "
                                                "trackio (optional extras); metrics.jsonl is always written.")]
    = None,
    wandb_project: WandbProject = None,
    wandb_entity: WandbEntity = None,
    wandb_tags: WandbTags = None,
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
                       sources=split_list(sources), wandb_project=wandb_project, wandb_entity=wandb_entity,
                       wandb_tags=split_list(wandb_tags))
    if cfg.tracker != "wandb" and given & {"wandb_project", "wandb_entity", "wandb_tags"}:
        log.warning("--wandb-*: recorded in the run's config, but this run tracks with %s: only a `wmctl eval "
                    "--tracker wandb` of it logs to W&B (pass --tracker wandb to train there too)", cfg.tracker)
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


decoder_app = new_app("The visualisation decoder (tokens -> pixels; for looking only).")


def eval_(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: the newest under runs/).")] = None,
    ckpt: Annotated[Path | None, typer.Option(help="A checkpoint folder (instead of --run).")] = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the one the run was trained on).")] = None,
    horizons: Annotated[str, typer.Option(help="Comma-separated horizons in frames.")]
    = ",".join(map(str, EvalConfig.horizons)),
    split: Annotated[str, typer.Option(help="Episodes to evaluate on.")] = EvalConfig.split,
    episodes: Annotated[int | None, typer.Option(help="Held-out episodes scored: at most N of --split per condition "
                                                 "(default all; up to 4 windows each).")] = None,
    context: Annotated[int | None, typer.Option(help="Context frames (default: half the model's window).")] = None,
    k: Annotated[int, typer.Option(help="Shortcut sampling steps per frame.")] = EvalConfig.k,
    samples: Annotated[int, typer.Option(help="Model samples per window (the energy score's draws; a deterministic "
                                              "model: 1).")] = EvalConfig.samples,
    moving_fraction: Annotated[float, typer.Option(help="Moving tokens: the top fraction by true change.")]
    = EvalConfig.moving_fraction,
    ema: Annotated[bool, typer.Option("--ema/--raw", help="EMA or raw weights.")] = True,
    baseline: Annotated[list[Path] | None, typer.Option(help="Other run/checkpoint to compare (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of noise and probe.")] = EvalConfig.seed,
    out: Annotated[Path | None, typer.Option(help="Output folder (default <run>/eval); given, eval writes nothing into "
                                             "the run (its --tracker figures go there too).")] = None,
    decoder: Annotated[Path | None, typer.Option(help="Visualisation decoder: also write rollout PNG grids.")] = None,
    rollouts: Annotated[int, typer.Option(help="Rollout grids to write with --decoder.")] = EvalConfig.rollouts,
    device: AutoDevice = "auto",
    tracker: Annotated[str, typer.Option(help="none | tensorboard | wandb | trackio: the figures next to the run's "
                                              "training curves.")] = EvalConfig.tracker,
    set_: Sets = None,
) -> None:
    """Latent prediction error at horizons vs copy-last and baselines; error vs K; a state probe."""
    cfg = EvalConfig(ckpt=resolve_run(run, ckpt), store=store, horizons=int_list(horizons), split=split,
                     episodes=episodes, context=context, k=k, samples=samples, moving_fraction=moving_fraction,
                     weights="ema" if ema else "model",
                     baselines=tuple(baseline or ()), seed=seed, out=out, decoder=decoder, rollouts=rollouts,
                     device=str(resolve_device(device)), tracker=tracker)
    cfg = apply_set(cfg, set_, what="eval")
    with progress("eval", total=None, unit="windows") as advance:
        result = run_eval(cfg, on_total=advance.set_total, on_progress=advance)
    con = console()
    for table in eval_tables(result):
        con.print(table)
    for source, split in result.splits.items():
        typer.echo(f"{source}: {split}")
    typer.echo(f"wrote {result.out}/eval.json" + "".join(f", {p}" for p in (result.plots or [])
                                                         + (result.rollouts or [])))


def visualize(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: newest under runs/).")] = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the run's).")] = None,
    decoder: Annotated[Path | None, typer.Option(help="Decoder folder (default: newest under runs/).")] = None,
    episode: Annotated[int | None, typer.Option(help="Episode index (default: the first val episode).")] = None,
    start: Annotated[int, typer.Option(help="First frame.")] = VisualizeConfig.start,
    horizon: Annotated[int, typer.Option(help="Frames to roll out.")] = VisualizeConfig.horizon,
    out: Annotated[Path, typer.Option(help="Output file: .png (grid), .gif or .mp4.")] = Path("rollout.png"),
    k: Annotated[int, typer.Option(help="Shortcut steps per frame.")] = VisualizeConfig.k,
    device: Annotated[str, typer.Option(help=f"{DEVICE_HELP[:-1]}: the model's rollouts (the decoder runs on the "
                                             "CPU).")] = "auto",
    set_: Sets = None,
) -> None:
    """Ground truth | decoded true latents | decoded rollouts with and without actions, frame numbered."""
    cfg = VisualizeConfig(run=resolve_run(run, None), out=out, store=store, decoder=decoder, episode=episode,
                          start=start, horizon=horizon, k=k, device=str(resolve_device(device)))
    cfg = apply_set(cfg, set_, what="visualize")
    with progress("visualize", total=None, unit="frames") as advance:
        res = run_visualize(cfg, on_total=advance.set_total, on_progress=advance)
    typer.echo(f"wrote {res['out']} ({res['frames']} frames: {', '.join(res['rows'])})")


@decoder_app.command("train")
def decoder_train(
    store: Annotated[Path, typer.Option(help="Token store.")] = Path("tokens.zarr"),
    source: Annotated[str | None, typer.Option(help="Store source (default: the first).")] = None,
    camera: Annotated[int, typer.Option(help="Camera index within the source.")] = DecoderConfig.camera,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<time>-decoder).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = DecoderConfig.steps,
    max_frames: Annotated[int, typer.Option(help="Train frames to decode and hold in memory.")]
    = DecoderConfig.max_frames,
    device: AutoDevice = "auto",
    set_: Sets = None,
) -> None:
    """Train a decoder from frozen store tokens to the original frames (L2); report val PSNR vs the mean image."""
    cfg = DecoderConfig(store=store, source=source, camera=camera, out=out or new_decoder_dir(), steps=steps,
                        max_frames=max_frames, device=str(resolve_device(device)))
    cfg = apply_set(cfg, set_, what="decoder train")
    with progress("decoder train", total=cfg.steps, unit="steps") as advance:
        res = run_decoder_train(cfg, on_progress=advance)
    typer.echo(f"decoder {res['out']}: val PSNR {res['val_psnr']:.2f} dB vs mean-image baseline "
               f"{res['mean_image_psnr']:.2f} dB ({res['train_frames']} train / {res['val_frames']} val frames of "
               f"{res['source']}:{res['camera_key']}, {res['seconds']:.0f}s)")


def train_proposal_cmd(
    run: Annotated[Path | None, typer.Option(help="Run folder or checkpoint (default: the newest run).")] = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the run's).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    horizon: Annotated[int, typer.Option(help="Model frames of actions proposed (the planning horizon).")]
    = ProposalConfig.horizon,
    max_goal: Annotated[int, typer.Option(help="Goals drawn 1..N model frames ahead (0: twice the horizon).")]
    = ProposalConfig.max_goal,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = ProposalConfig.batch_size,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = ProposalConfig.lr,
    seed: Annotated[int, typer.Option(help="Seed.")] = ProposalConfig.seed,
    save_every: Annotated[int, typer.Option(help="Keep its progress every N steps (0: never): the same command "
                                              "continues after a stop.")] = 200,
    device: AutoDevice = "auto",
    set_: Sets = None,
) -> None:
    """Train the run's amortized proposal: a small goal-conditioned policy head on the labelled latents (current
    and goal frame -> the next `horizon` actions), saved in <run>/proposal/ for `--planner cem+proposal|proposal`."""
    from trainer.proposal_train import train_proposal

    cfg = apply_set(ProposalConfig(horizon=horizon, max_goal=max_goal, batch_size=batch_size, lr=lr, seed=seed), set_,
                    what="train-proposal")
    rep = train_proposal(resolve_run(run, None), store, steps, config=cfg, device=str(resolve_device(device)),
                         save_every=save_every)
    if not rep.trained:
        typer.echo(f"nothing to do: {rep.folder} holds a proposal of this configuration")
        return
    err = rep.action_error or {}
    score = ", ".join(f"{k} {v:.3f}" for k, v in err.items()) if err else "no labelled val window long enough"
    typer.echo(f"proposal {rep.folder}: {rep.steps} steps, {rep.params:,} parameters, train loss {rep.train_loss:.4f};"
               f" val action error (std units): {score}")


def bench_rollout_cmd(
    preset: Annotated[str, typer.Option(help="Model preset (freshly initialised: timing only).")] = "small",
    horizon: Annotated[int, typer.Option(help="Frames to generate.")] = 20,
    batch: Annotated[int, typer.Option(help="Rollouts in one batch.")] = 8,
    k: Annotated[int, typer.Option(help="Shortcut steps per frame.")] = 4,
    grid: Annotated[str, typer.Option(help="Token grid per frame, HxW (16x16 = ViT-B/16 at 256 px).")] = "6x6",
    enc_dim: Annotated[int, typer.Option(help="Token width (768 for ViT-B).")] = 32,
    window: Annotated[int | None, typer.Option(help="Time-attention window (default context + horizon).")] = None,
    device: AutoDevice = "auto",
) -> None:
    """KV-cached vs uncached rollout of the same model and noise: time, speedup and their max difference."""
    result = bench_rollout(preset_name=preset, horizon=horizon, batch=batch, k=k,
                           grid=hxw(grid, "--grid", "6x6 or 16x16"), enc_dim=enc_dim, window=window, device=device)
    print_result(f"rollout: {preset}, horizon {horizon}", result)


def bench_train_cmd(
    store: Annotated[Path, typer.Option(help="Token store.")] = Path("tokens.zarr"),
    preset: Annotated[str, typer.Option(help="Model preset.")] = "small",
    steps: Annotated[int, typer.Option(help="Steps to run; up to 5 warm-up steps are not timed (5+ stay).")] = 30,
    device: AutoDevice = "auto",
) -> None:
    """Step time, tokens/s, data-wait share (and MFU on a known GPU) of real training steps on a store."""
    print_result(f"train: {preset} on {store}", bench_train(store=store, preset_name=preset, steps=steps,
                                                             device=device))
