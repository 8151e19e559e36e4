"""`wmctl data pusht|multicam|metaworld`: the built-in LeRobot v3.0 datasets, written with lerobot's own writer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.base import new_app
from pipeline.cli.progress import progress
from pipeline.demodata.metaworld import MetaworldDataConfig, run_data_metaworld
from pipeline.demodata.multicam import MulticamDataConfig, run_data_multicam
from pipeline.demodata.pusht import PushtDataConfig, run_data_pusht

app = new_app("Write the built-in LeRobot v3.0 datasets (with lerobot's own writer).")

Out = Annotated[Path, typer.Option(help="Dataset root to write.")]
ActionFree = Annotated[bool, typer.Option("--action-free", help="Write no action feature.")]
Force = Annotated[bool, typer.Option(help="Replace a dataset `wmctl data` wrote before with another config (never a "
                                       "folder it did not write).")]


def _repo_id(out: Path) -> str:
    """`local/<the folder's name>` (of the folder itself for `.` or `..`)."""
    return f"local/{Path(os.path.abspath(out)).name}"


def _write(name: str, run, cfg, force: bool) -> bool:
    """`run(cfg, force, on_progress)` (a `run_data_*`) behind a progress bar of its episodes."""
    with progress(f"data {name}", total=cfg.episodes, unit="episodes") as advance:
        return run(cfg, force=force, on_progress=advance)


def _done(wrote: bool, out: Path, episodes: int, action_free: bool) -> None:
    typer.echo(f"{'wrote' if wrote else 'nothing to do:'} {out} ({episodes} episodes"
               f"{', action-free' if action_free else ''})")


@app.command("pusht")
def data_pusht(
    out: Out = Path("data/pusht-demo"),
    episodes: Annotated[int, typer.Option(help="Number of episodes.")] = PushtDataConfig.episodes,
    seed: Annotated[int, typer.Option(help="Seed for starts and the scripted policy.")] = PushtDataConfig.seed,
    frames_per_episode: Annotated[int, typer.Option(help="Frames per episode (10 fps).")]
    = PushtDataConfig.frames_per_episode,
    size: Annotated[int, typer.Option(help="Rendered image size (96 = gym-pusht native).")] = PushtDataConfig.size,
    action_free: ActionFree = False,
    force: Force = False,
) -> None:
    """gym-pusht rollouts of a scripted pusher (10 fps, agent-xy state, target-xy action)."""
    cfg = PushtDataConfig(out=out, episodes=episodes, seed=seed, frames_per_episode=frames_per_episode, size=size,
                          action_free=action_free, repo_id=_repo_id(out))
    _done(_write("pusht", run_data_pusht, cfg, force), out, episodes, action_free)


@app.command("multicam")
def data_multicam(
    out: Out = Path("data/multicam-demo"),
    episodes: Annotated[int, typer.Option(help="Number of episodes.")] = MulticamDataConfig.episodes,
    seed: Annotated[int, typer.Option(help="Seed.")] = MulticamDataConfig.seed,
    min_frames: Annotated[int, typer.Option(help="Shortest episode (frames at 15 fps).")]
    = MulticamDataConfig.min_frames,
    max_frames: Annotated[int, typer.Option(help="Longest episode.")] = MulticamDataConfig.max_frames,
    arm: Annotated[str, typer.Option(help="droid: 3 cameras, 8-D, 15 fps | own: \"your own arm\", 2 cameras "
                                     "(front, wrist), 7-D delta end-effector action and state, 10 fps.")]
    = MulticamDataConfig.arm,
    action_free: ActionFree = False,
    force: Force = False,
) -> None:
    """Synthetic DROID-shaped set: 3 cameras at 180x320, 15 fps, 8-D state/action, multi-file layout (or, with
    --arm own, the same world seen and driven like your own arm)."""
    cfg = MulticamDataConfig(out=out, episodes=episodes, seed=seed, min_frames=min_frames, max_frames=max_frames,
                             action_free=action_free, repo_id=_repo_id(out), arm=arm)
    _done(_write("multicam", run_data_multicam, cfg, force), out, episodes, action_free)


@app.command("metaworld")
def data_metaworld(
    out: Out = Path("data/metaworld-reach"),
    task: Annotated[str, typer.Option(help="reach | push.")] = MetaworldDataConfig.task,
    episodes: Annotated[int, typer.Option(help="Number of episodes.")] = MetaworldDataConfig.episodes,
    seed: Annotated[int, typer.Option(help="Seed for task variations and exploration.")] = MetaworldDataConfig.seed,
    frames_per_episode: Annotated[int, typer.Option(help="Frames per episode.")]
    = MetaworldDataConfig.frames_per_episode,
    size: Annotated[int, typer.Option(help="Rendered image size (96, 128, 224, ...).")] = MetaworldDataConfig.size,
    fps: Annotated[int, typer.Option(help="Control and recording rate (a divisor of 400: 10, 20, 40, ...).")]
    = MetaworldDataConfig.fps,
    action_free: ActionFree = False,
    force: Force = False,
) -> None:
    """Meta-World reach/push with a Sawyer arm: scripted policies + exploration, exterior + wrist cameras,
    4-D delta end-effector xyz + gripper actions, the full simulator state (headless EGL rendering)."""
    cfg = MetaworldDataConfig(out=out, task=task, episodes=episodes, seed=seed, frames_per_episode=frames_per_episode,
                              size=size, fps=fps, action_free=action_free, repo_id=_repo_id(out))
    _done(_write("metaworld", run_data_metaworld, cfg, force), out, episodes, action_free)
