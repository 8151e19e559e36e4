"""Built-in LeRobot v3.0 datasets, written by lerobot itself (`LeRobotDataset.create` ... `finalize`).

`wmctl data pusht` (gym-pusht rollouts of a scripted pusher) and `wmctl data multicam` (a synthetic
DROID-shaped 3-camera set). Both write into a staging directory and rename it into place after
`finalize()`, so an interrupted run never leaves a half-written dataset under the requested name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.sims import GENERATOR_MARKER
from pipeline.stage import ConfigMismatchError, UserError, atomic_write_json, owner_tag, read_json, to_jsonable

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
) -> bool:
    """Write `num_episodes` episodes from `episode_fn(ep)` with lerobot. Returns False if already done."""
    out = Path(out)
    cfg = to_jsonable(generator_config)
    if out.exists():
        marker = out / MARKER
        if marker.exists() and not force:
            old = read_json(marker)
            if old == cfg:
                log.info("%s already holds this dataset (same generator config): nothing to do", out)
                return False
            from pipeline.stage import config_differences

            raise ConfigMismatchError(f"dataset {out}", config_differences(old, cfg), "Pass --force to regenerate.")
        if not force:
            raise UserError(f"{out} exists and was not written by `wmctl data`; choose another --out or --force")

    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder logs every stream's settings otherwise: errors only
    from pipeline.lerobot_compat import create_dataset

    staging = out.parent / f".{out.name}.staging.{owner_tag()}"
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
        ds.finalize()
        atomic_write_json(staging / MARKER, cfg)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return True


def video_feature(height: int, width: int) -> dict:
    return {"dtype": "video", "shape": (height, width, 3), "names": ["height", "width", "channels"]}


def vector_feature(names: list[str]) -> dict:
    return {"dtype": "float32", "shape": (len(names),), "names": names}


def f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)
