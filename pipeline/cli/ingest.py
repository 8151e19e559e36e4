"""`wmctl ingest` and `wmctl datasets`: validate a LeRobot v3.0 dataset into a manifest; list the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.base import console, split_list
from pipeline.cli.progress import progress
from pipeline.ingest import IngestResult, run_ingest
from pipeline.ingest_config import IngestConfig, ingest_config
from pipeline.lerobot_io import check_dataset_root
from pipeline.manifest import read_manifest, split_summary
from pipeline.registry import available, load_spec, resolve_source
from pipeline.stage import ShardSpec, UserError


def ingest(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset name.")] = None,
    root: Annotated[Path | None, typer.Option(help="LeRobot v3.0 dataset root (instead of --dataset).")] = None,
    repo_id: Annotated[str | None, typer.Option(help="Repo id (default: from the registry or local/<dir>).")] = None,
    out: Annotated[Path | None, typer.Option(help="Manifest path (default manifests/<dataset>.parquet).")] = None,
    cameras: Annotated[str | None, typer.Option(help="Comma-separated camera keys (default: registry/all).")] = None,
    no_actions: Annotated[bool, typer.Option("--no-actions", help="Treat as action-free.")] = False,
    val_fraction: Annotated[float | None, typer.Option(help="Held-out share of episodes.")] = None,
    val_episodes: Annotated[int, typer.Option(help="Hold out exactly this many whole episodes (a benchmark's fixed "
                                              "held-out set) instead of a share.")] = 0,
    split_seed: Annotated[int, typer.Option(help="Seed of the hash split.")] = IngestConfig.split_seed,
    split_by: Annotated[str | None, typer.Option(help="Group split: a per-episode metadata column, task, or "
                                                "task:REGEX (e.g. 'task:scene (\\d+)'); every episode of a group "
                                                "in one split (default: registry / per episode).")] = None,
    video_check: Annotated[str, typer.Option(help="ends | full | none.")] = IngestConfig.video_check,
    tolerance_s: Annotated[float, typer.Option(help="Timestamp tolerance (s).")] = IngestConfig.tolerance_s,
    shard: Annotated[str | None, typer.Option(help="I/N: do blocks b with b % N == I.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the manifest exists with another config.")] = False,
) -> None:
    """Validate every episode of a LeRobot v3.0 dataset and write a Parquet manifest."""
    src = resolve_source(dataset, root, repo_id)
    info = check_dataset_root(src.root)
    cfg = ingest_config(src, out=out, cameras=split_list(cameras), no_actions=no_actions, val_fraction=val_fraction,
                        split_by=split_by, split_seed=split_seed, val_episodes=val_episodes, video_check=video_check,
                        tolerance_s=tolerance_s,
                        shard=ShardSpec.parse(shard), force=force)
    with progress(f"ingest {src.name}", total=info.get("total_episodes"), unit="episodes") as advance:
        result = run_ingest(cfg, on_episode=advance)
    _summary(cfg, result)


def _summary(cfg: IngestConfig, result: IngestResult) -> None:
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
    if result.manifest is not None:
        typer.echo(split_summary(result.manifest))
        typer.echo(capacity_summary(result.manifest))
    if result.n_failed:
        typer.echo("failed episodes are kept out of later stages; fix them and re-run with --force", err=True)
        raise typer.Exit(1)


def datasets() -> None:
    """List the registered datasets (one TOML file each; add yours to ./registry/)."""
    from rich.table import Table
    from rich.text import Text

    table = Table("name", "repo id", "root", "cameras", "actions", "mix", "file")
    for name, path in available().items():
        try:
            s = load_spec(path)
        except UserError as e:  # one unreadable file (not TOML, not UTF-8, a folder) flags its row, the rest list
            table.add_row(name, Text(f"unreadable: {e}", style="red"), "", "", "", "", str(path))
            continue
        cams = str(len(s.cameras) or "all")
        if s.camera_slots:  # their roles (the model's camera slots)
            cams += f": {', '.join(slot for slot, _ in s.camera_slots)}"
        table.add_row(name, s.repo_id, str(s.resolved_root()), cams, "yes" if s.use_actions else "no",
                      f"{s.mix_weight:g}", str(path))
    console().print(table)


def capacity_summary(manifest: Path, tokens: int = 196, dim: int = 768) -> str:
    """One line: the token store this manifest makes with the default encoder (DINOv3 ViT-B/16 at 224x224: 196
    tokens x 768 per camera), every frame of every camera, float16 and int8, uncompressed (`wmctl encode` prints
    the projection for its own settings before it starts)."""
    from featurestore.store import projected_bytes

    df, _ = read_manifest(manifest)
    ok = df[df.status == "ok"]
    if ok.empty:
        return "projected token store: no ok episodes"
    frames, cameras = int(ok.length.sum()), len(ok.iloc[0].camera_keys)
    kw = dict(cameras=cameras, tokens=tokens, dim=dim, action_dim=int(ok.action_dim.max()),
              state_dim=int(ok.state_dim.max()))
    fp16, int8 = (projected_bytes(frames, dtype=d, **kw) / 1e9 for d in ("float16", "int8"))
    return (f"projected token store: {frames} frames x {cameras} camera(s) at ViT-B/16 224x224 ({tokens} tokens x "
            f"{dim}): {fp16:.3f} GB float16, {int8:.3f} GB int8 (uncompressed)")
