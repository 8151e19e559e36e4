"""The `wmctl` command line: thin Typer commands (parse -> build config -> `run_<stage>(cfg)`).

Exit codes: 0 done (or nothing to do); 1 finished but some episodes failed (they are listed, the rest
is committed); 2 the user must act before anything can run (bad path, bad config, changed config).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.logs import progress, setup_logging
from pipeline.stage import ShardSpec, UserError

log = logging.getLogger("wmctl")

app = typer.Typer(
    name="wmctl",
    help="Latent world models from LeRobot video: data -> ingest -> encode -> train -> eval -> plan.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Write the built-in LeRobot v3.0 datasets (with lerobot's own writer).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
encoder_app = typer.Typer(help="Encoder utilities.", no_args_is_help=True)
app.add_typer(encoder_app, name="encoder")
decoder_app = typer.Typer(help="The visualisation decoder (tokens -> pixels; for looking only).",
                          no_args_is_help=True)
app.add_typer(decoder_app, name="decoder")
plan_app = typer.Typer(help="Goal-conditioned MPC in latent space (CEM or gradient).", no_args_is_help=True)
app.add_typer(plan_app, name="plan")
bench_app = typer.Typer(help="Benchmarks (not tests): side-by-side ratios plus absolute numbers and the machine.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def console():
    """A rich console; in batch logs (not a terminal: SLURM, CI) wide enough that tables keep their columns."""
    import os

    from rich.console import Console

    return Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=160)


def _split_list(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else ()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_logging(verbose)


# ---------------------------------------------------------------------------------------------- data
@data_app.command("pusht")
def data_pusht(
    out: Annotated[Path, typer.Option(help="Dataset root to write.")] = Path("data/pusht-demo"),
    episodes: Annotated[int, typer.Option(help="Number of episodes.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed for starts and the scripted policy.")] = 0,
    frames_per_episode: Annotated[int, typer.Option(help="Frames per episode (10 fps).")] = 100,
    size: Annotated[int, typer.Option(help="Rendered image size (96 = gym-pusht native).")] = 96,
    action_free: Annotated[bool, typer.Option("--action-free", help="Write no action feature.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing dataset.")] = False,
) -> None:
    """gym-pusht rollouts of a scripted pusher (10 fps, agent-xy state, target-xy action)."""
    from pipeline.demodata.pusht import PushtDataConfig, run_data_pusht

    try:
        cfg = PushtDataConfig(out=out, episodes=episodes, seed=seed, frames_per_episode=frames_per_episode,
                              size=size, action_free=action_free, repo_id=f"local/{out.name}")
        wrote = run_data_pusht(cfg, force=force)
    except (UserError, ValueError) as e:
        fail(str(e))
    typer.echo(f"{'wrote' if wrote else 'nothing to do:'} {out} ({episodes} episodes"
               f"{', action-free' if action_free else ''})")


@data_app.command("multicam")
def data_multicam(
    out: Annotated[Path, typer.Option(help="Dataset root to write.")] = Path("data/multicam-demo"),
    episodes: Annotated[int, typer.Option(help="Number of episodes.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    min_frames: Annotated[int, typer.Option(help="Shortest episode (frames at 15 fps).")] = 40,
    max_frames: Annotated[int, typer.Option(help="Longest episode.")] = 70,
    action_free: Annotated[bool, typer.Option("--action-free", help="Write no action feature.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing dataset.")] = False,
) -> None:
    """Synthetic DROID-shaped set: 3 cameras at 180x320, 15 fps, 8-D state/action, multi-file layout."""
    from pipeline.demodata.multicam import MulticamDataConfig, run_data_multicam

    try:
        cfg = MulticamDataConfig(out=out, episodes=episodes, seed=seed, min_frames=min_frames,
                                 max_frames=max_frames, action_free=action_free, repo_id=f"local/{out.name}")
        wrote = run_data_multicam(cfg, force=force)
    except (UserError, ValueError) as e:
        fail(str(e))
    typer.echo(f"{'wrote' if wrote else 'nothing to do:'} {out} ({episodes} episodes"
               f"{', action-free' if action_free else ''})")


# -------------------------------------------------------------------------------------------- ingest
def resolve_source(dataset: str | None, root: Path | None, repo_id: str | None):
    """(name, root, repo_id, spec or None) from `--dataset NAME` or `--root PATH`."""
    from pipeline.registry import resolve

    if bool(dataset) == bool(root):
        raise UserError("give exactly one of --dataset NAME (see `wmctl datasets`) or --root PATH")
    if dataset:
        spec = resolve(dataset)
        return spec.name, spec.resolved_root(), repo_id or spec.repo_id, spec
    assert root is not None
    return root.resolve().name, root, repo_id or f"local/{root.resolve().name}", None


@app.command()
def ingest(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset name.")] = None,
    root: Annotated[Path | None, typer.Option(help="LeRobot v3.0 dataset root (instead of --dataset).")] = None,
    repo_id: Annotated[str | None, typer.Option(help="Repo id (default: from the registry or local/<dir>).")] = None,
    out: Annotated[Path | None, typer.Option(help="Manifest path (default manifests/<dataset>.parquet).")] = None,
    cameras: Annotated[str | None, typer.Option(help="Comma-separated camera keys (default: registry/all).")] = None,
    no_actions: Annotated[bool, typer.Option("--no-actions", help="Treat as action-free.")] = False,
    val_fraction: Annotated[float | None, typer.Option(help="Held-out share of episodes.")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the hash split.")] = 0,
    video_check: Annotated[str, typer.Option(help="ends | full | none.")] = "ends",
    tolerance_s: Annotated[float, typer.Option(help="Timestamp tolerance (s).")] = 1e-4,
    shard: Annotated[str | None, typer.Option(help="I/N: do blocks b with b % N == I.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the manifest exists with another config.")] = False,
) -> None:
    """Validate every episode of a LeRobot v3.0 dataset and write a Parquet manifest."""
    from pipeline.ingest import IngestConfig, run_ingest
    from pipeline.lerobot_io import check_dataset_root

    try:
        name, ds_root, rid, spec = resolve_source(dataset, root, repo_id)
        info = check_dataset_root(ds_root)
        cfg = IngestConfig(
            source=name,
            root=ds_root,
            repo_id=rid,
            out=out or Path("manifests") / f"{name}.parquet",
            cameras=_split_list(cameras) or (spec.cameras if spec else ()),
            use_actions=not no_actions and (spec.use_actions if spec else True),
            val_fraction=val_fraction if val_fraction is not None else (spec.val_fraction if spec else 0.1),
            split_seed=split_seed,
            video_check=video_check,
            tolerance_s=tolerance_s,
            shard=ShardSpec.parse(shard),
            force=force,
        )
        with progress(f"ingest {name}", total=info.get("total_episodes"), unit="episodes") as advance:
            result = run_ingest(cfg, on_episode=advance)
    except UserError as e:
        fail(str(e))
    _ingest_summary(cfg, result)


def _ingest_summary(cfg, result) -> None:
    for ep, reason in result.failures:
        typer.secho(f"error: {cfg.source} episode {ep}: {reason}", fg=typer.colors.RED, err=True)
    if result.nothing_to_do:
        typer.echo(f"nothing to do: {result.manifest} is up to date ({result.n_ok} ok, {result.n_failed} failed)")
    elif result.manifest is None:
        typer.echo(f"shard {cfg.shard}: {result.blocks_done_here} block(s) done; the manifest is written when "
                   f"all shards finish ({result.n_ok} ok, {result.n_failed} failed so far)")
    else:
        typer.echo(f"manifest {result.manifest}: {result.n_ok} ok, {result.n_failed} failed "
                   f"({result.seconds:.1f}s)")
    if result.n_failed:
        typer.echo("failed episodes are kept out of later stages; fix them and re-run with --force", err=True)
        raise typer.Exit(1)


@app.command()
def datasets() -> None:
    """List the registered datasets (one TOML file each; add yours to ./registry/)."""
    from rich.table import Table

    from pipeline.registry import available, load_spec

    table = Table("name", "repo id", "root", "cameras", "actions", "mix", "file")
    for name, path in available().items():
        try:
            s = load_spec(path)
        except UserError as e:
            table.add_row(name, f"[red]{e}[/red]", "", "", "", "", str(path))
            continue
        table.add_row(name, s.repo_id, str(s.resolved_root()), str(len(s.cameras) or "all"),
                      "yes" if s.use_actions else "no", f"{s.mix_weight:g}", str(path))
    console().print(table)


# -------------------------------------------------------------------------------------------- encode
def _hxw(text: str, option: str = "--image-size", example: str = "224 or 224x400") -> tuple[int, int]:
    """'N' or 'HxW' -> (H, W); a clear error naming the option otherwise."""
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise UserError(f"{option} {text!r}: expected N or HxW, e.g. {example}") from None


@app.command()
def encode(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset (uses manifests/<name>.parquet).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Manifest from `wmctl ingest` (instead of --dataset).")] = None,
    store: Annotated[Path, typer.Option(help="Token store (Zarr v3 directory).")] = Path("tokens.zarr"),
    encoder: Annotated[str, typer.Option(help="Encoder: local save_pretrained dir or HF id (cache).")] = "",
    cameras: Annotated[str | None, typer.Option(help="Comma-separated subset of the manifest's cameras.")] = None,
    image_size: Annotated[str, typer.Option(help="N or HxW, multiples of the patch size.")] = "224",
    resize: Annotated[str, typer.Option(help="crop (keep aspect, center crop) | squash.")] = "crop",
    dtype: Annotated[str, typer.Option(help="float16 | int8 (per-token scale).")] = "float16",
    batch_size: Annotated[int, typer.Option(help="Frames per encoder batch.")] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    threads: Annotated[int, typer.Option(help="torch threads (0: default).")] = 0,
    augment_views: Annotated[int, typer.Option(help="Extra augmented views per episode.")] = 0,
    augment_strength: Annotated[float, typer.Option(help="Colour jitter / crop strength in [0, 1].")] = 0.5,
    chunk_frames: Annotated[int, typer.Option(help="Frames per Zarr chunk (read unit).")] = 4,
    shard_frames: Annotated[int, typer.Option(help="Frames per Zarr shard (write unit).")] = 256,
    episodes_per_segment: Annotated[int, typer.Option(help="Episode indices per segment block.")] = 16,
    shard: Annotated[str | None, typer.Option(help="I/N: this process takes segments with (block+view) % N == I.")]
    = None,
    dask: Annotated[str | None, typer.Option(help="'local' (a LocalCluster) or a scheduler address.")] = None,
    dask_workers: Annotated[int, typer.Option(help="Workers of --dask local.")] = 2,
    retry_failed: Annotated[bool, typer.Option(help="Try episodes recorded as failed again.")] = False,
    force: Annotated[bool, typer.Option(help="Rebuild a store/source made with another config.")] = False,
) -> None:
    """Encode every camera frame of a manifest with a frozen DINOv3 into the token store."""
    from featurestore.encode import EncodeConfig, run_encode
    from featurestore.encoders import DEFAULT_ENCODER, Preprocess
    from featurestore.store import StoreLayout

    try:
        if bool(dataset) == bool(manifest):
            raise UserError("give exactly one of --dataset NAME or --manifest PATH")
        if dataset:
            manifest = Path("manifests") / f"{dataset}.parquet"
            if not manifest.exists():
                raise UserError(f"{manifest} does not exist: run `wmctl ingest --dataset {dataset}` first")
        h, w = _hxw(image_size)
        cfg = EncodeConfig(
            manifest=manifest, store=store, encoder=encoder or DEFAULT_ENCODER, cameras=_split_list(cameras),
            preprocess=Preprocess(height=h, width=w, resize=resize),
            layout=StoreLayout(dtype=dtype, chunk_frames=chunk_frames, shard_frames=shard_frames,
                               episodes_per_segment=episodes_per_segment),
            batch_size=batch_size, device=device, threads=threads, augment_views=augment_views,
            augment_strength=augment_strength, shard=ShardSpec.parse(shard), dask=dask, dask_workers=dask_workers,
            retry_failed=retry_failed, force=force,
        )
        with progress(f"encode {manifest.stem}", total=None, unit="frames") as advance:
            result = run_encode(cfg, on_frames=advance, on_plan=advance.set_total)
    except UserError as e:
        fail(str(e))
    for source, ep, view, reason in result.failures:
        typer.secho(f"error: {source} episode {ep} (view {view}): {reason}", fg=typer.colors.RED, err=True)
    if result.nothing_to_do:
        typer.echo(f"nothing to do: every episode of {manifest} is in {store} (shard {cfg.shard})")
    else:
        rate = result.frames / max(result.seconds, 1e-9)
        typer.echo(f"{store}: committed {result.segments_committed} segment(s), {result.frames} frames "
                   f"in {result.seconds:.1f}s ({rate:.1f} frames/s); `wmctl status --store {store}`")
    if result.failures:
        typer.echo("failed episodes are recorded in the store; fix them and re-run with --retry-failed", err=True)
        raise typer.Exit(1)


@app.command()
def status(store: Annotated[Path, typer.Option(help="Token store.")] = Path("tokens.zarr")) -> None:
    """Per source: episodes committed / failed / pending, frames, bytes on disk, encoder identity."""

    from featurestore.status import status_table, store_status

    try:
        info = store_status(store)
    except UserError as e:
        fail(str(e))
    console().print(status_table(info))


@encoder_app.command("init-random")
def encoder_init_random(
    out: Annotated[Path, typer.Option(help="Directory to save_pretrained into.")] = Path("models/dinov3-random-tiny"),
    preset: Annotated[str, typer.Option(help="tiny (dim 32, 2 layers) | vitb16 (ViT-B/16 shapes).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Init seed.")] = 0,
) -> None:
    """Save a randomly initialised DINOv3 (for tests and demos without pretrained weights)."""
    from featurestore.encoders import init_random_dinov3

    try:
        if (out / "config.json").exists():
            typer.echo(f"nothing to do: {out} exists")
            return
        init_random_dinov3(out, preset=preset, seed=seed)
    except UserError as e:
        fail(str(e))
    typer.secho(f"wrote {out}: a DINOv3 with RANDOM weights (preset {preset}); tokens from it are not DINO "
                "features", fg=typer.colors.YELLOW)


# --------------------------------------------------------------------------------------------- train
@app.command()
def train(
    store: Annotated[Path, typer.Option(help="Token store.")] = Path("tokens.zarr"),
    preset: Annotated[str, typer.Option(help="tiny (tests) | small (CPU minutes) | base (GPU).")] = "small",
    model: Annotated[str, typer.Option(help="shortcut | teacher-forced (the DINO-WM baseline).")] = "shortcut",
    out: Annotated[Path | None, typer.Option(help="Run folder (default: a new one under runs/).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue --out from its newest complete checkpoint.")] = False,
    init_from: Annotated[Path | None, typer.Option(help="Fine-tune from this run/checkpoint (EMA weights).")] = None,
    steps: Annotated[int | None, typer.Option(help="Total optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows per rank per micro-step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda.")] = None,
    sources: Annotated[str | None, typer.Option(help="Comma-separated store sources (default all).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config field: key=value or "
                                                  "model.key=value (repeatable).")] = None,
) -> None:
    """Train the shortcut-forcing dynamics (or the teacher-forced baseline) on a token store."""
    import dataclasses

    from trainer.config import apply_overrides
    from trainer.config import preset as get_preset
    from trainer.loop import Preempted, run_train

    try:
        cfg = get_preset(preset)
        kind = model.replace("-", "_")
        changes = {"store": store, "out": out, "init_from": init_from,
                   "model": dataclasses.replace(cfg.model, kind=kind)}
        for key, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr), ("device", device),
                           ("seed", seed)):
            if value is not None:
                changes[key] = value
        if sources:
            changes["sources"] = _split_list(sources)
        cfg = apply_overrides(dataclasses.replace(cfg, **changes), set_ or [])
        with progress("train", total=cfg.steps, unit="steps", every_s=1e9) as advance:
            last = {"step": 0}

            def on_step(row: dict) -> None:
                advance(row["step"] - last["step"], loss=f"{row['loss']:.4f}")
                last["step"] = row["step"]
                if row["step"] % cfg.log_every == 0 or "val_loss" in row:
                    log.info("step %d  " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                     if k != "step" and isinstance(v, float)), row["step"])

            result = run_train(cfg, resume=resume, on_step=on_step)
    except Preempted as e:
        typer.secho(str(e), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(3) from None
    except UserError as e:
        fail(str(e))
    final = result.metrics[-1] if result.metrics else {}
    summary = ", ".join(f"{k} {final[k]:.4g}" for k in ("loss", "val_loss", "val_pred_mse", "val_copy_mse")
                        if k in final)
    typer.echo(f"run {result.run_dir}: step {result.step}, checkpoint {result.last_checkpoint}; {summary}")


# ---------------------------------------------------------------------------------------------- eval
def _int_list(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _split_list(text))
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None


def _resolve_run(run: Path | None, ckpt: Path | None) -> Path:
    from trainer.api import newest_run

    if run and ckpt:
        raise UserError("give --run or --ckpt, not both")
    return ckpt or run or newest_run()


@app.command("eval")
def eval_(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: the newest under runs/).")] = None,
    ckpt: Annotated[Path | None, typer.Option(help="A checkpoint folder (instead of --run).")] = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the one the run was trained on).")] = None,
    horizons: Annotated[str, typer.Option(help="Comma-separated horizons in frames.")] = "1,5,10,20",
    split: Annotated[str, typer.Option(help="Episodes to evaluate on.")] = "val",
    episodes: Annotated[int | None, typer.Option(help="At most N episodes per condition.")] = None,
    context: Annotated[int | None, typer.Option(help="Context frames (default: half the model's window).")] = None,
    k: Annotated[int, typer.Option(help="Shortcut sampling steps per frame.")] = 4,
    ema: Annotated[bool, typer.Option("--ema/--raw", help="EMA or raw weights.")] = True,
    baseline: Annotated[list[Path] | None, typer.Option(help="Other run/checkpoint to compare (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of noise and probe.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default <run>/eval).")] = None,
    decoder: Annotated[Path | None, typer.Option(help="Visualisation decoder: also write rollout PNG grids.")] = None,
    rollouts: Annotated[int, typer.Option(help="Rollout grids to write with --decoder.")] = 3,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
) -> None:
    """Latent prediction error at horizons vs copy-last and baselines; error vs K; a state probe."""
    from trainer.eval import EvalConfig, run_eval

    try:
        cfg = EvalConfig(ckpt=_resolve_run(run, ckpt), store=store, horizons=_int_list(horizons), split=split,
                         episodes=episodes, context=context, k=k, weights="ema" if ema else "model",
                         baselines=tuple(baseline or ()), seed=seed, out=out, decoder=decoder,
                         rollouts=rollouts, device=device)
        result = run_eval(cfg)
    except UserError as e:
        fail(str(e))

    from trainer.eval_report import eval_tables

    con = console()
    for table in eval_tables(result):
        con.print(table)
    typer.echo(f"wrote {result['out']}/eval.json" + "".join(f", {p}" for p in result.get("plots", [])
                                                            + result.get("rollouts", [])))


# ----------------------------------------------------------------------------------- decoder, visualize
@decoder_app.command("train")
def decoder_train(
    store: Annotated[Path, typer.Option(help="Token store.")] = Path("tokens.zarr"),
    source: Annotated[str | None, typer.Option(help="Store source (default: the first).")] = None,
    camera: Annotated[int, typer.Option(help="Camera index within the source.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<time>-decoder).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1500,
    max_frames: Annotated[int, typer.Option(help="Train frames to decode and hold in memory.")] = 4000,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
) -> None:
    """Train a decoder from frozen store tokens to the original frames (L2); report val PSNR vs the mean image."""
    from featurestore.decoder import DecoderConfig, run_decoder_train

    try:
        res = run_decoder_train(DecoderConfig(store=store, source=source, camera=camera, out=out, steps=steps,
                                              max_frames=max_frames, device=device))
    except UserError as e:
        fail(str(e))
    typer.echo(f"decoder {res['out']}: val PSNR {res['val_psnr']:.2f} dB vs mean-image baseline "
               f"{res['mean_image_psnr']:.2f} dB ({res['train_frames']} train / {res['val_frames']} val frames of "
               f"{res['source']}:{res['camera_key']}, {res['seconds']:.0f}s)")


@app.command()
def visualize(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: newest under runs/).")] = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the run's).")] = None,
    decoder: Annotated[Path | None, typer.Option(help="Decoder folder (default: newest under runs/).")] = None,
    episode: Annotated[int | None, typer.Option(help="Episode index (default: the first val episode).")] = None,
    start: Annotated[int, typer.Option(help="First frame.")] = 0,
    horizon: Annotated[int, typer.Option(help="Frames to roll out.")] = 10,
    out: Annotated[Path, typer.Option(help="Output file: .png (grid), .gif or .mp4.")] = Path("rollout.png"),
    k: Annotated[int, typer.Option(help="Shortcut steps per frame.")] = 4,
) -> None:
    """Ground truth | decoded true latents | decoded rollouts with and without actions, frame numbered."""
    from pipeline.visualize import VisualizeConfig, run_visualize

    try:
        res = run_visualize(VisualizeConfig(run=_resolve_run(run, None), out=out, store=store, decoder=decoder,
                                            episode=episode, start=start, horizon=horizon, k=k))
    except UserError as e:
        fail(str(e))
    typer.echo(f"wrote {res['out']} ({res['frames']} frames: {', '.join(res['rows'])})")


# ---------------------------------------------------------------------------------------------- plan
def _load_model(run: Path | None, ckpt: Path | None, device: str, compile: bool = False):
    from trainer.api import LoadedWorldModel

    return LoadedWorldModel.load(_resolve_run(run, ckpt), device=device, compile=compile)


def _plan_configs(planner: str, samples: int, elites: int, iterations: int, horizon: int):
    from planner.cem import CEMConfig
    from planner.gd import GDConfig

    if planner not in ("cem", "gd"):
        raise UserError(f"--planner {planner!r}: choose cem or gd")
    return (CEMConfig(horizon=horizon, samples=samples, elites=elites, iterations=iterations),
            GDConfig(horizon=horizon, restarts=max(1, samples // 16), iterations=iterations * 4))


@plan_app.command("offline")
def plan_offline(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: newest under runs/).")] = None,
    ckpt: Annotated[Path | None, typer.Option(help="Checkpoint folder.")] = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the run's).")] = None,
    goal_offset: Annotated[int, typer.Option(help="Goal H frames after the start.")] = 5,
    planner: Annotated[str, typer.Option(help="cem | gd.")] = "cem",
    samples: Annotated[int, typer.Option(help="CEM samples per iteration.")] = 64,
    elites: Annotated[int, typer.Option(help="CEM elites.")] = 8,
    iterations: Annotated[int, typer.Option(help="CEM iterations (GD: 4x).")] = 5,
    episodes: Annotated[int | None, typer.Option(help="At most N val episodes.")] = None,
    state_weight: Annotated[float, typer.Option(help="Weight of the state distance (models with proprio).")] = 1.0,
    k: Annotated[int, typer.Option(help="Shortcut steps per frame in the planner's rollouts.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model's rollouts (the first "
                                          "plan compiles: tens of seconds on CPU).")] = False,
) -> None:
    """Plan from frame t to the encoded frame t+H on labelled val episodes; compare with GT and random actions."""
    import json

    from featurestore.reader import TokenReader
    from planner.offline import OfflineConfig, run_plan_offline
    from trainer.api import run_store

    try:
        wm = _load_model(run, ckpt, device, compile)
        reader = TokenReader(store or run_store(wm.checkpoint))
        if reader.encoder != wm.encoder:
            raise UserError(f"{reader.path} was made with another encoder than {wm.name}")
        cem, gd = _plan_configs(planner, samples, elites, iterations, goal_offset)
        res = run_plan_offline(wm, reader, OfflineConfig(goal_offset=goal_offset, planner=planner, cem=cem, gd=gd,
                                                         episodes=episodes, seed=seed, state_weight=state_weight, k=k))
    except UserError as e:
        fail(str(e))
    out = wm.checkpoint.parent.parent / "plan"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"offline_{planner}.json").write_text(json.dumps(res, indent=2))
    d = res["latent_distance"]
    typer.echo(f"{res['problems']} problems, goal {goal_offset} frames ahead, {planner}: latent distance to goal "
               f"plan {d['plan']:.4f} | ground-truth actions {d['ground_truth']:.4f} | random {d['random_mean']:.4f} "
               f"(best of {64}: {d['random_best']:.4f}); plan closer than random in "
               f"{100 * res['plan_closer_than_random']:.0f}%; action error vs GT (std units) plan "
               f"{res['action_error_vs_ground_truth']['plan']:.3f} "
               f"random {res['action_error_vs_ground_truth']['random']:.3f}; "
               f"latency p50 {res['latency_s']['p50'] * 1000:.0f} ms. Wrote {out}/offline_{planner}.json")


@plan_app.command("sim")
def plan_sim(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: newest under runs/).")] = None,
    ckpt: Annotated[Path | None, typer.Option(help="Checkpoint folder.")] = None,
    env: Annotated[str, typer.Option(help="Simulator (pusht).")] = "pusht",
    episodes: Annotated[int, typer.Option(help="Trials.")] = 10,
    goal_offset: Annotated[int, typer.Option(help="Env steps replayed to make the goal.")] = 15,
    max_steps: Annotated[int, typer.Option(help="MPC env steps per trial.")] = 30,
    horizon: Annotated[int, typer.Option(help="Planning horizon (frames).")] = 5,
    execute: Annotated[int, typer.Option(help="Frames executed per plan.")] = 2,
    planner: Annotated[str, typer.Option(help="cem | gd.")] = "cem",
    samples: Annotated[int, typer.Option(help="CEM samples.")] = 64,
    elites: Annotated[int, typer.Option(help="CEM elites.")] = 8,
    iterations: Annotated[int, typer.Option(help="CEM iterations.")] = 5,
    shift: Annotated[str, typer.Option(help="none | lighting | background.")] = "none",
    state_weight: Annotated[float, typer.Option(help="Weight of the state distance (models with proprio).")] = 1.0,
    k: Annotated[int, typer.Option(help="Shortcut steps per frame in the planner's rollouts.")] = 4,
    cost_frames: Annotated[str, typer.Option(help="all: goal distance averaged over the planned frames; last: "
                                             "the last frame only.")] = "all",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model's rollouts (the first "
                                          "plan compiles: tens of seconds on CPU).")] = False,
) -> None:
    """Closed-loop MPC in gym-pusht towards goals from held-out episodes; random-action baseline alongside."""
    import json

    from featurestore.encoders import HFDinoEncoder, Preprocess
    from featurestore.reader import TokenReader
    from pipeline.ingest import read_manifest
    from planner.sim_pusht import SimConfig, run_plan_sim
    from trainer.api import run_store

    try:
        if env != "pusht":
            raise UserError(f"--env {env!r}: only pusht is wired up")
        wm = _load_model(run, ckpt, device, compile)
        reader = TokenReader(run_store(wm.checkpoint))
        labelled = [s for s in reader.store.sources() if reader.source_attrs(s).get("has_actions")]
        if not labelled:
            raise UserError(f"{reader.path} has no labelled source to take start states and goals from")
        rows, mmeta = read_manifest(Path(reader.source_attrs(labelled[0])["manifest"]))
        size = int(mmeta["features"][reader.source_attrs(labelled[0])["cameras"][0]]["shape"][0])
        enc = HFDinoEncoder(wm.encoder["model_id"], preprocess=Preprocess(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in wm.encoder["preprocess"].items()}), device=device)
        if enc.identity()["weights_sha256"] != wm.encoder["weights_sha256"]:
            raise UserError(f"the encoder at {wm.encoder['model_id']} is not the one {wm.name} was trained on")

        def encode_frame(img, state):
            return wm.normalize(enc.encode(torch_from(img))["patch"][0], state)  # [P, Z] (+ state) -> [N, Z]

        out = wm.checkpoint.parent.parent / "plan" / f"sim_{planner}_{shift}"
        cem, gd = _plan_configs(planner, samples, elites, iterations, horizon)
        cfg = SimConfig(trials=episodes, goal_offset=goal_offset, max_steps=max_steps, horizon=horizon,
                        execute=execute, planner=planner, cem=cem, gd=gd, shift=shift, seed=seed, out=out,
                        state_weight=state_weight, k=k, cost_frames=cost_frames)
        res = run_plan_sim(wm, encode_frame, rows, size, cfg)
    except UserError as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim.json").write_text(json.dumps(res, indent=2))
    for policy in ("model", "random"):
        r = res[policy]
        lat = f", plan latency p50 {r['latency_s']['p50'] * 1000:.0f} ms p95 {r['latency_s']['p95'] * 1000:.0f} ms" \
            if r["latency_s"] else ""
        reached = f" (in {r['steps_to_success']:.0f} env steps on average)" if r["steps_to_success"] else ""
        typer.echo(f"{policy:>6}: success {100 * r['success_rate']:.0f}% of {res['trials']}{reached}, final distance "
                   f"{r['final_pos_dist']:.1f} px (start {r['start_pos_dist']:.1f}), angle {r['final_angle_dist']:.2f} "
                   f"rad, action smoothness {r['smoothness']:.2f}{lat}")
    typer.echo(f"wrote {out}/sim.json" + "".join(f", {p}" for p in res.get("strips", [])))


def torch_from(img):
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(img))[None]


# --------------------------------------------------------------------------------------------- bench
def _print_bench(title: str, result: dict) -> None:
    import json

    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in result.items():
        table.add_row(k, f"{v:.3g}" if isinstance(v, float) else str(v))
    console().print(table)
    typer.echo(json.dumps(result))


@bench_app.command("decode")
def bench_decode_cmd(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset.")] = "multicam-demo",
    root: Annotated[Path | None, typer.Option(help="Dataset root (instead of --dataset).")] = None,
    episodes: Annotated[int | None, typer.Option(help="Only the first N episodes.")] = None,
) -> None:
    """Sequential PyAV decode vs lerobot per-item access (pyav backend) on the same frames."""
    from pipeline.bench import bench_decode

    try:
        name, ds_root, rid, _ = resolve_source(None if root else dataset, root, None)
        result = bench_decode(ds_root, rid, episodes)
    except UserError as e:
        fail(str(e))
    _print_bench(f"decode: {name}", result)


@bench_app.command("encode")
def bench_encode_cmd(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset (manifests/<name>.parquet).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Manifest (instead of --dataset).")] = None,
    encoder: Annotated[str, typer.Option(help="Encoder dir or id.")] = "",
    image_size: Annotated[str, typer.Option(help="N or HxW.")] = "224",
    batch_size: Annotated[int, typer.Option(help="Frames per batch.")] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    episodes: Annotated[int | None, typer.Option(help="Only the first N ok episodes.")] = None,
) -> None:
    """Decode-only, encoder-only, write-only and pipelined frames/s on the same frames; bytes per frame."""
    from featurestore.bench import bench_encode
    from featurestore.encode import EncodeConfig
    from featurestore.encoders import DEFAULT_ENCODER, Preprocess

    try:
        if bool(dataset) == bool(manifest):
            raise UserError("give exactly one of --dataset NAME or --manifest PATH")
        manifest = manifest or Path("manifests") / f"{dataset}.parquet"
        h, w = _hxw(image_size)
        cfg = EncodeConfig(manifest=manifest, store=Path("unused"), encoder=encoder or DEFAULT_ENCODER,
                           preprocess=Preprocess(height=h, width=w), batch_size=batch_size, device=device)
        result = bench_encode(cfg, max_episodes=episodes)
    except UserError as e:
        fail(str(e))
    _print_bench(f"encode: {manifest}", result)


@bench_app.command("rollout")
def bench_rollout_cmd(
    preset: Annotated[str, typer.Option(help="Model preset (freshly initialised: timing only).")] = "small",
    horizon: Annotated[int, typer.Option(help="Frames to generate.")] = 20,
    batch: Annotated[int, typer.Option(help="Rollouts in one batch.")] = 8,
    k: Annotated[int, typer.Option(help="Shortcut steps per frame.")] = 4,
    grid: Annotated[str, typer.Option(help="Token grid per frame, HxW (16x16 = ViT-B/16 at 256 px).")] = "6x6",
    enc_dim: Annotated[int, typer.Option(help="Token width (768 for ViT-B).")] = 32,
    window: Annotated[int | None, typer.Option(help="Time-attention window (default context + horizon).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
) -> None:
    """KV-cached vs uncached rollout of the same model and noise: time, speedup and their max difference."""
    from trainer.bench import bench_rollout

    try:
        result = bench_rollout(preset_name=preset, horizon=horizon, batch=batch, k=k,
                               grid=_hxw(grid, "--grid", "6x6 or 16x16"), enc_dim=enc_dim, window=window,
                               device=device)
    except UserError as e:
        fail(str(e))
    _print_bench(f"rollout: {preset}, horizon {horizon}", result)


@bench_app.command("plan")
def bench_plan_cmd(
    presets: Annotated[str, typer.Option(help="Comma-separated model presets.")] = "tiny,small,base",
    samples: Annotated[int, typer.Option(help="CEM samples.")] = 64,
    iterations: Annotated[int, typer.Option(help="CEM iterations.")] = 5,
    horizon: Annotated[int, typer.Option(help="Planning horizon (frames).")] = 5,
    grid: Annotated[str, typer.Option(help="Token grid per frame, HxW.")] = "6x6",
    enc_dim: Annotated[int, typer.Option(help="Token width.")] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="Also time it torch.compiled, side by side.")] = False,
) -> None:
    """Milliseconds per MPC step (one CEM optimisation) and model evaluations per step, per preset."""
    import json

    from rich.table import Table

    from trainer.bench import bench_plan

    try:
        result = bench_plan(presets=_split_list(presets), samples=samples, iterations=iterations, horizon=horizon,
                            grid=_hxw(grid, "--grid", "6x6 or 16x16"), enc_dim=enc_dim, device=device,
                            compile=compile)
    except UserError as e:
        fail(str(e))
    table = Table(title=f"plan: CEM {samples}x{iterations}, horizon {horizon}, {result['device']} ({result['cpu']})")
    cols = ["preset", "params (M)", "ms / MPC step", "model evals / step"]
    for col in cols + (["compiled ms / step", "speedup", "compile s"] if compile else []):
        table.add_column(col)
    for r in result["rows"]:
        cells = [r["preset"], f"{r['params_M']:.2f}", f"{r['ms_per_mpc_step']:.0f}", str(r["model_evals_per_step"])]
        if compile:
            cells += [f"{r['ms_per_mpc_step_compiled']:.0f}", f"{r['compile_speedup']:.2f}x", f"{r['compile_s']:.0f}"]
        table.add_row(*cells)
    console().print(table)
    typer.echo(json.dumps(result))


@bench_app.command("train")
def bench_train_cmd(
    store: Annotated[Path, typer.Option(help="Token store.")] = Path("tokens.zarr"),
    preset: Annotated[str, typer.Option(help="Model preset.")] = "small",
    steps: Annotated[int, typer.Option(help="Steps to run; up to 5 warm-up steps are not timed (5+ stay).")] = 30,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
) -> None:
    """Step time, tokens/s, data-wait share (and MFU on a known GPU) of real training steps on a store."""
    from trainer.bench import bench_train

    try:
        result = bench_train(store=store, preset_name=preset, steps=steps, device=device)
    except UserError as e:
        fail(str(e))
    _print_bench(f"train: {preset} on {store}", result)


def run() -> None:  # pragma: no cover - console entry for `python -m pipeline.cli`
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    run()
