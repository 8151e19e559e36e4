"""`wmctl bench encode`: decode-only, encoder-only, write-only and the whole pipeline on the same frames.

One run, same segment, same batches. On a CPU the stages share the cores, so the pipeline is compared with
the serial sum of the stages (target >= 1.0); on a GPU with the slowest stage (target >= 0.9). Also the
stored bytes per frame per camera (fp16 and int8) and random-window read speed for several chunk sizes.
"""

from __future__ import annotations

import dataclasses
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.encode_plan import ACTION_KEY, STATE_KEY, EncodeConfig, SegmentPlan, SourceInfo, source_info
from featurestore.encode_segment import _decode_camera, _encode_batch, _lowdim, encode_one
from featurestore.encoders import HFDinoEncoder
from featurestore.reader import TokenReader, Window
from featurestore.store import TokenStore
from pipeline.lerobot_io import DataFileCache
from pipeline.machine import machine_description
from pipeline.manifest import read_manifest


def _decode_all(src, plan, cfg) -> list[list[np.ndarray]]:
    out: list[list[np.ndarray]] = []
    for c in range(len(src.cameras)):
        q: queue.Queue = queue.Queue()
        t = threading.Thread(target=_decode_camera, args=(src, plan, c, q, threading.Event(), cfg.tolerance_s))
        t.start()
        frames = []
        for _ in range(plan.frames):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            frames.append(item)
        t.join()
        out.append(frames)
    return out


def _parallel_decode(src, plan, cfg) -> float:
    """Decode-only with the pipeline's parallelism (one thread per camera), frames discarded."""
    qs = [queue.Queue(maxsize=64) for _ in src.cameras]
    threads = [threading.Thread(target=_decode_camera, args=(src, plan, c, qs[c], threading.Event(),
                                                             cfg.tolerance_s)) for c in range(len(qs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for q in qs:
        for _ in range(plan.frames):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def bench_encode(cfg: EncodeConfig, *, max_episodes: int | None = None, read_windows: int = 200,
                 window: int = 16) -> dict[str, Any]:
    src, plan = _bench_plan(cfg, max_episodes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    encoder = HFDinoEncoder(cfg.encoder, preprocess=cfg.preprocess, device=cfg.resolved_device())
    C, N = len(src.cameras), plan.frames
    tmp = Path(tempfile.mkdtemp(prefix="wmctl-bench-"))
    res: dict[str, Any] = {"frames": N, "cameras": C, "images": N * C, "encoder": encoder.model_id,
                           "random_weights": encoder.random_weights, "grid": list(encoder.grid),
                           "dim": encoder.embed_dim, "device": str(encoder.device), "batch_size": cfg.batch_size}
    try:
        # 1. decode only (the pipeline's per-camera threads), then keep the frames for stage 2
        t_dec = _parallel_decode(src, plan, cfg)
        frames = _decode_all(src, plan, cfg)
        # 2. encoder only, on decoded frames (warm-up batch first)
        t_enc, outs = _time_encoder(encoder, frames, N, cfg.batch_size)
        lowdim = _lowdim(src, plan, DataFileCache(columns=[ACTION_KEY, STATE_KEY]))
        # 3. write only, fp16 and int8
        t_write, bytes_per = _time_writes(cfg, encoder, src, plan, outs, lowdim, tmp)
        # 4. the whole pipeline on the same segment
        t_pipe = _time_pipeline(cfg, encoder, src, plan, tmp)
        stages = {"decode": t_dec, "encoder": t_enc, "write": t_write[cfg.layout.dtype]}
        res.update(_pipeline_ratios(stages, t_pipe, N, encoder.device.type == "cuda"))
        res["bytes_per_frame_per_camera_fp16"] = bytes_per["float16"]
        res["bytes_per_frame_per_camera_int8"] = bytes_per["int8"]
        res["raw_fp16_bytes_per_frame_per_camera"] = outs[0][1][0, 0].nbytes
        res.update(_bench_reads(outs, encoder, src, lowdim, tmp, cfg.layout, N, C, read_windows, window))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["machine"] = machine_description()
    return res


def _bench_plan(cfg: EncodeConfig, max_episodes: int | None) -> tuple[SourceInfo, SegmentPlan]:
    """The manifest's source and one segment of its ok episodes (the first `max_episodes` of them)."""
    manifest, mmeta = read_manifest(cfg.manifest)
    src = source_info(manifest, mmeta, cfg.cameras)
    ok = manifest[manifest.status == "ok"].sort_values("episode_index")
    if max_episodes:
        ok = ok.iloc[:max_episodes]
    plan = SegmentPlan(src.name, 0, 0, tuple({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                             for k, v in r.to_dict().items()} for _, r in ok.iterrows()))
    return src, plan


def _time_encoder(encoder: HFDinoEncoder, frames: list[list[np.ndarray]], N: int, batch_size: int
                  ) -> tuple[float, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Encoder only, on decoded frames, after a warm-up batch: (seconds, the batches as the writer takes them)."""
    eps = np.zeros(N, dtype=int)
    _encode_batch(encoder, [f[: batch_size] for f in frames], eps[: batch_size], {})
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    t0, outs = time.perf_counter(), []
    for s in range(0, N, batch_size):
        n = min(batch_size, N - s)
        p, c = _encode_batch(encoder, [f[s:s + n] for f in frames], eps[s:s + n], {})
        outs.append((s, p.transpose(0, 1).numpy().astype(np.float16), c.transpose(0, 1).numpy().astype(np.float16)))
    return time.perf_counter() - t0, outs


def _time_writes(cfg: EncodeConfig, encoder: HFDinoEncoder, src: SourceInfo, plan: SegmentPlan, outs: list,
                 lowdim: dict[str, np.ndarray], tmp: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Write only, fp16 and int8: (seconds, token bytes per frame per camera), by dtype."""
    C, N = len(src.cameras), plan.frames
    bytes_per = {}
    t_write = {}
    for dtype in ("float16", "int8"):
        layout = dataclasses.replace(cfg.layout, dtype=dtype)
        store = TokenStore.create_or_open(tmp / f"w-{dtype}.zarr", encoder.identity(), layout)
        store.ensure_source(src.name, {"cameras": src.cameras}, fixed_keys=())
        t0 = time.perf_counter()
        w = store.begin_segment(src.name, plan.seg_id, frames=N, cameras=C, tokens=outs[0][1].shape[2],
                                dim=encoder.embed_dim, action_dim=src.action_dim, state_dim=src.state_dim)
        for o in outs:
            w.add(*o)
        w.commit(attrs={"episodes": [], "frames": N, "view": 0}, **lowdim)
        t_write[dtype] = time.perf_counter() - t0
        seg = store.source_dir(src.name) / "segments" / plan.seg_id
        tok_bytes = sum(f.stat().st_size for name in ("patch", "patch_scale")
                        for f in (seg / name).rglob("*") if f.is_file())
        bytes_per[dtype] = tok_bytes / (N * C)
    return t_write, bytes_per


def _time_pipeline(cfg: EncodeConfig, encoder: HFDinoEncoder, src: SourceInfo, plan: SegmentPlan, tmp: Path) -> float:
    """The whole pipeline (`encode_one`) on the same segment: seconds."""
    store = TokenStore.create_or_open(tmp / "pipe.zarr", encoder.identity(), cfg.layout)
    store.ensure_source(src.name, {"cameras": src.cameras}, fixed_keys=())
    t0 = time.perf_counter()
    encode_one(store, encoder, src, plan, cfg)
    return time.perf_counter() - t0


def _pipeline_ratios(stages: dict[str, float], t_pipe: float, N: int, cuda: bool) -> dict[str, Any]:
    """Frames/s of each stage and of the pipeline, the pipeline against the serial sum and the slowest stage, and
    the target that applies on this device."""
    res: dict[str, Any] = {f"{k}_frames_per_s": N / v for k, v in stages.items()}
    res["pipeline_frames_per_s"] = N / t_pipe
    res["serial_sum_frames_per_s"] = N / sum(stages.values())
    res["pipeline_over_serial_sum"] = sum(stages.values()) / t_pipe
    res["pipeline_over_slowest_stage"] = max(stages.values()) / t_pipe
    res["slowest_stage"] = max(stages, key=stages.get)
    res["target"] = ("pipeline/slowest >= 0.9 (GPU)" if cuda else "pipeline/serial-sum >= 1.0 (CPU)")
    return res


def _bench_reads(outs, encoder, src, lowdim, tmp, layout, N, C, n_windows, T) -> dict[str, float]:
    """Random windows of T frames per second, for chunk sizes of 1, 4 and 16 frames."""
    out = {}
    rng = np.random.default_rng(0)
    for chunk in (1, 4, 16):
        lay = dataclasses.replace(layout, chunk_frames=chunk, shard_frames=max(chunk, layout.shard_frames))
        store = TokenStore.create_or_open(tmp / f"r{chunk}.zarr", encoder.identity(), lay)
        store.ensure_source(src.name, {"cameras": src.cameras}, fixed_keys=())
        w = store.begin_segment(src.name, "s", frames=N, cameras=C, tokens=outs[0][1].shape[2],
                                dim=encoder.embed_dim, action_dim=src.action_dim, state_dim=src.state_dim)
        for o in outs:
            w.add(*o)
        w.commit(attrs={"episodes": [{"episode_index": 0, "view": 0, "start": 0, "length": N, "split": "train",
                                      "has_actions": True, "task": ""}], "frames": N, "view": 0}, **lowdim)
        reader = TokenReader(tmp / f"r{chunk}.zarr")
        starts = rng.integers(0, max(1, N - T), size=n_windows)
        t0 = time.perf_counter()
        for s in starts:
            reader.read(Window(0, int(s), min(T, N)), fields=("patch",))
        dt = time.perf_counter() - t0
        out[f"read_windows_per_s_chunk{chunk}"] = n_windows / dt
    return out
