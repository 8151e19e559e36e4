"""`wmctl ingest` and `wmctl datasets`: validate a LeRobot v3.0 dataset into a manifest; list the registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.cli.base import Sets, console, split_list
from pipeline.cli.lazy import load
from pipeline.cli.progress import progress
from pipeline.cli.table import MANIFEST_NOTES
from pipeline.ingest_config import IngestConfig, ingest_config
from pipeline.overrides import apply_set
from pipeline.registry import available, load_spec, resolve_source
from pipeline.stage import ShardSpec, UserError

if TYPE_CHECKING:
    from pipeline.ingest import IngestResult


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
    set_: Sets = None,
) -> None:
    """Validate every episode of a LeRobot v3.0 dataset and write a Parquet manifest."""
    from pipeline.ingest import run_ingest  # the stage (pandas, pyarrow, PyAV): not imported for --help
    from pipeline.lerobot_io import check_dataset_root

    src = resolve_source(dataset, root, repo_id)
    info = check_dataset_root(src.root)
    cfg = ingest_config(src, out=out, cameras=split_list(cameras), no_actions=no_actions, val_fraction=val_fraction,
                        split_by=split_by, split_seed=split_seed, val_episodes=val_episodes, video_check=video_check,
                        tolerance_s=tolerance_s, shard=ShardSpec.parse(shard), force=force)
    cfg = apply_set(cfg, set_, what="ingest")
    with progress(f"ingest {src.name}", total=info.get("total_episodes"), unit="episodes") as advance:
        result = run_ingest(cfg, on_episode=advance)
    _summary(cfg, result)


def _summary(cfg: IngestConfig, result: IngestResult) -> None:
    from pipeline.manifest import split_summary

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
        for note in MANIFEST_NOTES:  # what later stages say of it (the token store it makes), loaded by name
            typer.echo(load(note)(result.manifest))
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

