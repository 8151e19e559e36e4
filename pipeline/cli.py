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
bench_app = typer.Typer(help="Benchmarks (not tests): side-by-side ratios plus absolute numbers and the machine.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


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
    from rich.console import Console
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
    Console().print(table)


# -------------------------------------------------------------------------------------------- encode
def _image_size(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise UserError(f"--image-size {text!r}: expected N or HxW, e.g. 224 or 224x400") from None


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
        h, w = _image_size(image_size)
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
    from rich.console import Console

    from featurestore.status import status_table, store_status

    try:
        info = store_status(store)
    except UserError as e:
        fail(str(e))
    Console().print(status_table(info))


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


# --------------------------------------------------------------------------------------------- bench
def _print_bench(title: str, result: dict) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in result.items():
        table.add_row(k, f"{v:.3g}" if isinstance(v, float) else str(v))
    Console().print(table)
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
        h, w = _image_size(image_size)
        cfg = EncodeConfig(manifest=manifest, store=Path("unused"), encoder=encoder or DEFAULT_ENCODER,
                           preprocess=Preprocess(height=h, width=w), batch_size=batch_size, device=device)
        result = bench_encode(cfg, max_episodes=episodes)
    except UserError as e:
        fail(str(e))
    _print_bench(f"encode: {manifest}", result)


def run() -> None:  # pragma: no cover - console entry for `python -m pipeline.cli`
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    run()
