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


def run() -> None:  # pragma: no cover - console entry for `python -m pipeline.cli`
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    run()
