"""`wmctl bench decode`: sequential PyAV decoding vs lerobot's per-item access, same frames, one run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipeline.frames import PyAVFrameSource, VideoSpan
from pipeline.lerobot_io import open_meta
from pipeline.machine import machine_description


def bench_decode(root: Path, repo_id: str, max_episodes: int | None = None) -> dict[str, Any]:
    """Decode every frame of every camera of the first `max_episodes` episodes both ways; check equality."""
    from pipeline.lerobot_compat import dataset_classes

    LeRobotDataset, _ = dataset_classes()

    meta = open_meta(root, repo_id)
    episodes = meta.episodes if max_episodes is None else meta.episodes.iloc[:max_episodes]
    cams = meta.video_keys
    n_frames = int(episodes["length"].sum()) * len(cams)

    t0 = time.perf_counter()
    ours: dict[tuple[int, str], Any] = {}
    with PyAVFrameSource() as src:
        for _, row in episodes.iterrows():
            for cam in cams:
                span = VideoSpan(meta.video_path(row, cam), float(row[f"videos/{cam}/from_timestamp"]),
                                 int(row["length"]), meta.fps)
                ours[(int(row["episode_index"]), cam)] = src.read_episode(span)
    t_seq = time.perf_counter() - t0

    ds = LeRobotDataset(repo_id, root=root, video_backend="pyav", episodes=list(episodes["episode_index"]))
    t0 = time.perf_counter()
    mismatches = 0
    for _, row in episodes.iterrows():
        ep, start = int(row["episode_index"]), int(row["dataset_from_index"])
        for i in range(int(row["length"])):
            item = ds[start - int(episodes["dataset_from_index"].iloc[0]) + i]
            for cam in cams:
                mine = torch.from_numpy(ours[(ep, cam)][i]).permute(2, 0, 1).float() / 255
                mismatches += int(not torch.equal(mine, item[cam]))
    t_lr = time.perf_counter() - t0
    return {
        "dataset": str(root),
        "episodes": len(episodes),
        "cameras": len(cams),
        "frames": n_frames,
        "sequential_fps": n_frames / t_seq,
        "lerobot_item_fps": n_frames / t_lr,
        "speedup": t_lr / t_seq,
        "mismatched_frames": mismatches,
        "machine": machine_description(),
    }
