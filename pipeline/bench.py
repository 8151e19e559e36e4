"""`wmctl bench decode`: sequential PyAV decoding vs lerobot's per-item access, same frames, one run; decoded
frames per CPU-second, and how many cores that takes to feed one GPU's encoder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipeline.frames import PyAVFrameSource, VideoSpan
from pipeline.lerobot_io import open_meta
from pipeline.machine import machine_description


def bench_decode(root: Path, repo_id: str, max_episodes: int | None = None, encoder_rate: float = 5000.0
                 ) -> dict[str, Any]:
    """Decode every frame of every camera of the first `max_episodes` episodes both ways; check equality.

    The sequential decode runs FFmpeg single-threaded (`PyAVFrameSource(threads=1)`, what `wmctl encode` runs
    per camera), so its frames per CPU-second (the process's CPU time: decode + RGB conversion) are one core's
    throughput; `cores_per_gpu` = `encoder_rate` (images/s one GPU's encoder takes in) / that."""
    from pipeline.lerobot_compat import dataset_classes

    LeRobotDataset, _ = dataset_classes()

    meta = open_meta(root, repo_id)
    episodes = meta.episodes if max_episodes is None else meta.episodes.iloc[:max_episodes]
    cams = meta.video_keys
    n_frames = int(episodes["length"].sum()) * len(cams)

    t0, c0 = time.perf_counter(), time.process_time()
    ours: dict[tuple[int, str], Any] = {}
    with PyAVFrameSource(threads=1) as src:
        for _, row in episodes.iterrows():
            for cam in cams:
                span = VideoSpan(meta.video_path(row, cam), float(row[f"videos/{cam}/from_timestamp"]),
                                 int(row["length"]), meta.fps)
                ours[(int(row["episode_index"]), cam)] = src.read_episode(span)
    t_seq, cpu_seq = time.perf_counter() - t0, time.process_time() - c0
    per_core = n_frames / cpu_seq

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
        "video": _video_format(meta.video_path(episodes.iloc[0], cams[0])),
        "sequential_fps": n_frames / t_seq,
        "decoder_threads": 1,
        "sequential_cpu_s": cpu_seq,
        "frames_per_cpu_s": per_core,
        "encoder_images_per_s_assumed": encoder_rate,
        "cores_per_gpu": encoder_rate / per_core,
        "lerobot_item_fps": n_frames / t_lr,
        "speedup": t_lr / t_seq,
        "mismatched_frames": mismatches,
        "machine": machine_description(),
    }


def _video_format(path: Path) -> str:
    """The decoder PyAV picked for a video's first stream, its size and pixel format ('libdav1d 320x180 yuv420p')."""
    import av

    with av.open(str(path)) as f:
        st = f.streams.video[0]
        return f"{st.codec_context.name} {st.codec_context.width}x{st.codec_context.height} {st.codec_context.pix_fmt}"
