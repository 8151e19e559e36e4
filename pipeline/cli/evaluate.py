"""`wmctl eval`, `wmctl visualize` and `wmctl decoder train`: how far the model can be trusted, and looking at it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featurestore.decoder import DecoderConfig, run_decoder_train
from pipeline.cli.base import console, int_list, new_app
from trainer.eval import EvalConfig, run_eval
from trainer.eval_report import eval_tables
from trainer.runs import new_decoder_dir, resolve_run
from trainer.visualize import VisualizeConfig, run_visualize

decoder_app = new_app("The visualisation decoder (tokens -> pixels; for looking only).")


def eval_(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: the newest under runs/).")] = None,
    ckpt: Annotated[Path | None, typer.Option(help="A checkpoint folder (instead of --run).")] = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the one the run was trained on).")] = None,
    horizons: Annotated[str, typer.Option(help="Comma-separated horizons in frames.")]
    = ",".join(map(str, EvalConfig.horizons)),
    split: Annotated[str, typer.Option(help="Episodes to evaluate on.")] = EvalConfig.split,
    episodes: Annotated[int | None, typer.Option(help="At most N episodes per condition.")] = None,
    context: Annotated[int | None, typer.Option(help="Context frames (default: half the model's window).")] = None,
    k: Annotated[int, typer.Option(help="Shortcut sampling steps per frame.")] = EvalConfig.k,
    samples: Annotated[int, typer.Option(help="Samples per window for a sampler (deterministic models: 1).")]
    = EvalConfig.samples,
    moving_fraction: Annotated[float, typer.Option(help="Moving tokens: the top fraction by true change.")]
    = EvalConfig.moving_fraction,
    ema: Annotated[bool, typer.Option("--ema/--raw", help="EMA or raw weights.")] = True,
    baseline: Annotated[list[Path] | None, typer.Option(help="Other run/checkpoint to compare (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of noise and probe.")] = EvalConfig.seed,
    out: Annotated[Path | None, typer.Option(help="Output folder (default <run>/eval); given, eval writes nothing into "
                                             "the run (its --tracker figures go there too).")] = None,
    decoder: Annotated[Path | None, typer.Option(help="Visualisation decoder: also write rollout PNG grids.")] = None,
    rollouts: Annotated[int, typer.Option(help="Rollout grids to write with --decoder.")] = EvalConfig.rollouts,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = EvalConfig.device,
    tracker: Annotated[str, typer.Option(help="none | tensorboard | wandb | trackio: the figures next to the run's "
                                              "training curves.")] = EvalConfig.tracker,
) -> None:
    """Latent prediction error at horizons vs copy-last and baselines; error vs K; a state probe."""
    cfg = EvalConfig(ckpt=resolve_run(run, ckpt), store=store, horizons=int_list(horizons), split=split,
                     episodes=episodes, context=context, k=k, samples=samples, moving_fraction=moving_fraction,
                     weights="ema" if ema else "model",
                     baselines=tuple(baseline or ()), seed=seed, out=out, decoder=decoder, rollouts=rollouts,
                     device=device, tracker=tracker)
    result = run_eval(cfg)
    con = console()
    for table in eval_tables(result):
        con.print(table)
    for source, split in result.get("splits", {}).items():
        typer.echo(f"{source}: {split}")
    typer.echo(f"wrote {result['out']}/eval.json" + "".join(f", {p}" for p in result.get("plots", [])
                                                            + result.get("rollouts", [])))


def visualize(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: newest under runs/).")] = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the run's).")] = None,
    decoder: Annotated[Path | None, typer.Option(help="Decoder folder (default: newest under runs/).")] = None,
    episode: Annotated[int | None, typer.Option(help="Episode index (default: the first val episode).")] = None,
    start: Annotated[int, typer.Option(help="First frame.")] = VisualizeConfig.start,
    horizon: Annotated[int, typer.Option(help="Frames to roll out.")] = VisualizeConfig.horizon,
    out: Annotated[Path, typer.Option(help="Output file: .png (grid), .gif or .mp4.")] = Path("rollout.png"),
    k: Annotated[int, typer.Option(help="Shortcut steps per frame.")] = VisualizeConfig.k,
) -> None:
    """Ground truth | decoded true latents | decoded rollouts with and without actions, frame numbered."""
    res = run_visualize(VisualizeConfig(run=resolve_run(run, None), out=out, store=store, decoder=decoder,
                                        episode=episode, start=start, horizon=horizon, k=k))
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
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = DecoderConfig.device,
) -> None:
    """Train a decoder from frozen store tokens to the original frames (L2); report val PSNR vs the mean image."""
    res = run_decoder_train(DecoderConfig(store=store, source=source, camera=camera, out=out or new_decoder_dir(),
                                          steps=steps, max_frames=max_frames, device=device))
    typer.echo(f"decoder {res['out']}: val PSNR {res['val_psnr']:.2f} dB vs mean-image baseline "
               f"{res['mean_image_psnr']:.2f} dB ({res['train_frames']} train / {res['val_frames']} val frames of "
               f"{res['source']}:{res['camera_key']}, {res['seconds']:.0f}s)")
