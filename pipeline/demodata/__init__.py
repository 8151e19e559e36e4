"""Built-in LeRobot v3.0 datasets, written by lerobot itself (`LeRobotDataset.create` ... `finalize`).

`wmctl data pusht` (gym-pusht rollouts of a scripted pusher) and `wmctl data multicam` (a synthetic
DROID-shaped 3-camera set). Both write into a staging directory and rename it into place after
`finalize()`, so an interrupted run never leaves a half-written dataset under the requested name; the next run
removes the staging folder a killed one left. `--force` replaces only what `wmctl data` wrote (`MARKER`).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.names import holds
from pipeline.sims import GENERATOR_MARKER
from pipeline.stage import (
    ConfigMismatchError,
    UserError,
    apply_umask,
    atomic_write_json,
    config_differences,
    fault_point,
    is_stale,
    owner_tag,
    read_json,
    to_jsonable,
)

log = logging.getLogger(__name__)

MARKER = GENERATOR_MARKER  # records how the dataset was generated (for idempotent reruns and `recorded_sim`)

Frame = dict[str, Any]
EpisodeFn = Callable[[int], Iterator[Frame]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class WriterSettings:
    """How lerobot lays out the files. Small limits make episodes span several data/video files."""

    fps: int
    robot_type: str
    vcodec: str = "libsvtav1"
    data_files_size_in_mb: float | None = None
    video_files_size_in_mb: float | None = None
    chunks_size: int | None = None


def write_dataset(
    *,
    out: Path,
    repo_id: str,
    features: dict[str, dict],
    settings: WriterSettings,
    num_episodes: int,
    episode_fn: EpisodeFn,
    generator_config: Any,
    force: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> bool:
    """Write `num_episodes` episodes from `episode_fn(ep)` with lerobot (`on_progress(1)` as each is saved).
    Returns False if already done.

    `force` replaces only a dataset `wmctl data` wrote (its marker `MARKER`), never a folder holding the working
    directory; the new dataset is staged beside `out` and renamed into place."""
    out = Path(os.path.normpath(out))
    if out.name in ("", ".."):  # `.` or `..`: name the folder itself, so that its staging sibling is beside it
        out = Path(os.path.abspath(out))
    cfg = to_jsonable(generator_config)
    write = _may_write(out, cfg, force)
    clean_stale_staging(out)
    if not write:
        return False
    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder logs every stream's settings otherwise: errors only
    from pipeline.lerobot_compat import create_dataset

    staging = _leftover_path(out, "staging")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds = create_dataset(
            repo_id=repo_id,
            fps=settings.fps,
            features=features,
            root=staging,
            robot_type=settings.robot_type,
            vcodec=settings.vcodec,
            chunks_size=settings.chunks_size,
            data_files_size_in_mb=settings.data_files_size_in_mb,
            video_files_size_in_mb=settings.video_files_size_in_mb,
        )
        for ep in range(num_episodes):
            n = 0
            for frame in episode_fn(ep):
                ds.add_frame(frame)
                n += 1
            ds.save_episode()
            log.info("episode %d/%d: %d frames", ep + 1, num_episodes, n)
            fault_point("data-episode")
            if on_progress is not None:
                on_progress(1)
        ds.finalize()
        atomic_write_json(staging / MARKER, cfg)
        _replace(out, staging)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return True


def _may_write(out: Path, cfg: Any, force: bool) -> bool:
    """False when `out` already holds this dataset; raises unless `out` is free, an empty folder, or (with `force`)
    a dataset `wmctl data` wrote that does not hold the working directory."""
    if not out.exists() and not out.is_symlink():
        return True
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()) and not holds(out, Path.cwd()):
        return True  # an empty folder made for it: nothing to lose
    marker = out / MARKER
    if out.is_symlink() or not out.is_dir() or not marker.is_file():
        raise UserError(f"{out} exists and was not written by `wmctl data` (no {MARKER}); wmctl never replaces a "
                        "folder it did not write: choose another --out")
    old = read_json(marker)
    if old == cfg and not force:
        log.info("%s already holds this dataset (same generator config): nothing to do", out)
        return False
    if holds(out, Path.cwd()):
        raise UserError(f"{out} is the working directory or holds it; wmctl will not replace it: choose another "
                        "--out (a folder of its own, e.g. data/<name>)")
    if not force:
        raise ConfigMismatchError(f"dataset {out}", config_differences(old, cfg), "Pass --force to regenerate.")
    return True


def _leftover_path(out: Path, kind: str) -> Path:
    """A private sibling of `out` for a writer's work in progress (`kind` staging) or the dataset it replaces
    (`replaced`), named with this process's owner tag so that a later run can tell a dead writer's leftovers."""
    return out.parent / f".{out.name}.{kind}.{owner_tag()}"


def _replace(out: Path, staging: Path) -> None:
    """Rename `staging` to `out`; an old dataset there is moved aside first and deleted after (a kill in between
    leaves it as a dead writer's leftover, removed by the next run). lerobot writes through temporary files
    (0600): the dataset gets the umask's modes first, so teammates can read it."""
    apply_umask(staging, tree=True)
    if out.exists():
        old = _leftover_path(out, "replaced")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def clean_stale_staging(out: Path) -> int:
    """Remove the staging and replaced folders beside `out` that dead writers left (`pipeline.stage.is_stale`: a
    process of this host that no longer runs, or another host's untouched for hours); a live writer's stay."""
    n = 0
    for kind in ("staging", "replaced"):
        prefix = f".{out.name}.{kind}."
        for p in out.parent.glob(f"{glob.escape(prefix)}*") if out.parent.is_dir() else ():
            if p.is_dir() and not p.is_symlink() and is_stale(p.name[len(prefix):], p):
                log.info("removing %s, left by a writer that is gone", p)
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def video_feature(height: int, width: int) -> dict:
    return {"dtype": "video", "shape": (height, width, 3), "names": ["height", "width", "channels"]}


def vector_feature(names: list[str]) -> dict:
    return {"dtype": "float32", "shape": (len(names),), "names": names}


def f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)
