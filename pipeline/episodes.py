"""One episode into one manifest row (`validate_episode`: every problem found, `status` ok/failed), and the
deterministic train/val split it falls in (by a hash of the episode or of its group, or an exact count held out).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.frames import PyAVFrameSource, VideoProber, VideoSpan
from pipeline.ingest_config import IngestConfig
from pipeline.lerobot_io import DataFileCache, DatasetMeta, stack_column
from pipeline.stage import UserError

ACTION_KEY = "action"
STATE_KEY = "observation.state"


def split_hash(source: str, episode: int, seed: int = 0, group: str = "") -> float:
    """A hash of (seed, source, episode) mapped to [0, 1); with a `group` (a scene, lab, date or task), of the
    group instead, so every episode of a group falls in the same split."""
    key = f"{seed}:{source}:{episode}" if not group else f"{seed}:{source}:group:{group}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(source: str, episode: int, val_fraction: float, seed: int = 0, group: str = "") -> str:
    """Deterministic split: "val" when the episode's (or group's) hash is below `val_fraction`."""
    return "val" if split_hash(source, episode, seed, group) < val_fraction else "train"


def exact_val_episodes(source: str, episodes: list[int], n: int, seed: int = 0) -> frozenset[int]:
    """The `n` episodes held out by `--val-episodes n`: those first in hash order, so the split is as
    deterministic as the fractional one and its size exact (refused when the dataset has too few)."""
    if n >= len(episodes):
        raise UserError(f"--val-episodes {n}: the dataset has {len(episodes)} episodes; keep some for training")
    return frozenset(sorted(episodes, key=lambda e: split_hash(source, e, seed))[:n])


def split_group(row: pd.Series, split_by: str, task: str) -> str:
    """The group an episode splits with: "" for `split_by` "" (the episode itself); the task text for `task`;
    for `task:REGEX` the regex's first group (or whole match) in the task text; else the episode metadata
    column `split_by`. Raises ValueError (the episode fails, named) when the episode has no such value."""
    if not split_by:
        return ""
    if split_by == "task":
        return task
    if split_by.startswith("task:"):
        m = re.search(split_by[5:], task)
        if m is None:
            raise ValueError(f"--split-by {split_by!r}: the task {task!r} does not match")
        return m.group(1) if m.groups() else m.group(0)
    value = row.get(split_by)
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError(f"--split-by {split_by!r}: the episode has no value in that column")
    return _task_text(value)


def check_groups(df: pd.DataFrame) -> None:
    """Refuse a manifest where one split group has episodes in both splits (val would leak into train)."""
    if "split_group" not in df or not (df.split_group != "").any():
        return
    grouped = df[df.split_group != ""].groupby("split_group").split.nunique()
    straddling = sorted(grouped[grouped > 1].index)
    if straddling:
        raise UserError(f"split groups {straddling[:5]} have episodes in both train and val; rebuild the manifest "
                        "with --force (the blocks were made with different split settings)")


def _rel(meta: DatasetMeta, path: Path) -> str:
    return str(Path(path).relative_to(meta.root))


def _task_text(tasks: Any) -> str:
    return "; ".join(map(str, tasks)) if isinstance(tasks, (list, tuple, np.ndarray)) else str(tasks)


def _nonfinite(values: np.ndarray, what: str) -> str | None:
    bad = ~np.isfinite(values)
    if bad.any():
        frames = np.nonzero(bad.any(axis=1))[0]
        return f"{what} has {int(bad.sum())} non-finite values (first at frame {int(frames[0])})"
    return None


def validate_episode(
    meta: DatasetMeta,
    row: pd.Series,
    cfg: IngestConfig,
    cameras: list[str],
    data: DataFileCache,
    prober: VideoProber,
    frames: PyAVFrameSource | None,
    val_set: frozenset[int] | None = None,
) -> dict[str, Any]:
    """One manifest row for episode `row`, with `status` failed and every problem found in `reason`."""
    ep, length, fps = int(row["episode_index"]), int(row["length"]), meta.fps
    problems: list[str] = []
    has_actions = cfg.use_actions and ACTION_KEY in meta.features
    out: dict[str, Any] = {
        "source": cfg.source,
        "repo_id": cfg.repo_id,
        "root": str(Path(meta.root).resolve()),
        "episode_index": ep,
        "length": length,
        "fps": fps,
        "task": _task_text(row.get("tasks", "")),
        "split": "train",
        "split_group": "",
        "has_actions": has_actions,
        "action_dim": meta.feature_dim(ACTION_KEY) or 0,
        "state_dim": meta.feature_dim(STATE_KEY) or 0,
        "camera_keys": list(cameras),
        "video_files": [],
        "from_ts": [],
        "to_ts": [],
        "data_file": "",
    }
    if length <= 0:
        problems.append(f"length is {length}")
    problems += _row_problems(meta, row, cfg, data, out)
    problems += _video_problems(meta, row, cfg, cameras, prober, frames, out)
    try:
        out["split_group"] = split_group(row, cfg.split_by, out["task"])
    except ValueError as e:
        problems.append(str(e))
    out["split"] = (("val" if ep in val_set else "train") if val_set is not None else
                    split_of(cfg.source, ep, cfg.val_fraction, cfg.split_seed, out["split_group"]))
    out["status"] = "failed" if problems else "ok"
    out["reason"] = "; ".join(problems)
    return out


def _row_problems(meta: DatasetMeta, row: pd.Series, cfg: IngestConfig, data: DataFileCache,
                  out: dict[str, Any]) -> list[str]:
    """The low-dim data's problems: frame count, frame order, timestamps, action/state shapes and finiteness (and
    the data file, into `out`)."""
    length, fps, has_actions = out["length"], out["fps"], out["has_actions"]
    problems: list[str] = []
    try:
        path, rows = data.episode_rows(meta, row)
        out["data_file"] = _rel(meta, path)
        if len(rows) != length:
            problems.append(f"frame count mismatch: meta/episodes says length={length} but {out['data_file']} "
                            f"has {len(rows)} rows for this episode")
        elif len(rows):
            fi = rows["frame_index"].to_numpy()
            if not np.array_equal(fi, np.arange(length)):
                problems.append(f"frame_index is not 0..{length - 1} in {out['data_file']}")
            ts = rows["timestamp"].to_numpy(dtype=np.float64)
            err = np.abs(ts - np.arange(length) / fps)
            if err.max() > cfg.tolerance_s:
                k = int(err.argmax())
                problems.append(f"timestamp of frame {k} is {ts[k]:.6f}s, expected {k / fps:.6f}s "
                                f"(1/fps steps, tolerance {cfg.tolerance_s}s)")
            for key, expected in ((ACTION_KEY, out["action_dim"]), (STATE_KEY, out["state_dim"])):
                if key not in rows or (key == ACTION_KEY and not has_actions):
                    continue
                values = stack_column(rows, key)
                if values.shape[1] != expected:
                    problems.append(f"{key} has {values.shape[1]} dims per frame, info.json says {expected}")
                elif reason := _nonfinite(values, key):
                    problems.append(reason)
    except (FileNotFoundError, OSError, pa.ArrowException) as e:
        problems.append(f"cannot read data rows: {e}")
    return problems


def _video_problems(meta: DatasetMeta, row: pd.Series, cfg: IngestConfig, cameras: list[str],
                    prober: VideoProber, frames: PyAVFrameSource | None, out: dict[str, Any]) -> list[str]:
    """The videos' problems: file exists, per-episode time range matches length, first/last (or every) frame
    decodes (and each camera's file and time range, into `out`)."""
    length, fps = out["length"], out["fps"]
    problems: list[str] = []
    for cam in cameras:
        vpath = meta.video_path(row, cam)
        from_ts = float(row[f"videos/{cam}/from_timestamp"])
        to_ts = float(row[f"videos/{cam}/to_timestamp"])
        out["video_files"].append(_rel(meta, vpath))
        out["from_ts"].append(from_ts)
        out["to_ts"].append(to_ts)
        span = VideoSpan(vpath, from_ts, length, fps)
        if not vpath.exists():
            problems.append(f"{cam}: video file {out['video_files'][-1]} is missing")
            continue
        if round((to_ts - from_ts) * fps) != length:
            problems.append(f"{cam}: video range {from_ts:.3f}-{to_ts:.3f}s holds {round((to_ts - from_ts) * fps)} "
                            f"frames, episode length is {length}")
            continue
        if cfg.video_check == "ends" and (reason := prober.check(span)):
            problems.append(f"{cam}: {reason}")
        elif cfg.video_check == "full" and frames is not None:
            try:
                n = sum(1 for _ in frames.frames(span))
                if n != length:
                    problems.append(f"{cam}: decoded {n} frames, expected {length}")
            except Exception as e:  # noqa: BLE001 - any decode failure is this episode's problem
                problems.append(f"{cam}: {e}")
    return problems
