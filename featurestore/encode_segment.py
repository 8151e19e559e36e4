"""One segment of `wmctl encode`, pipelined: one decode thread per camera (sequential PyAV), encoder batches on the
calling thread, and a writer thread that writes each array shard once, whole (`encode_one`); a bad episode is
recorded as failed and the segment redone without it (`encode_segment`)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from featurestore.augment import ClipAugment
from featurestore.encode_plan import ACTION_KEY, STATE_KEY, EncodeConfig, EpisodeFailed, SegmentPlan, SourceInfo
from featurestore.encoders import HFDinoEncoder
from featurestore.store import TokenStore
from pipeline.frames import FrameDecodeError, PyAVFrameSource
from pipeline.lerobot_io import DataFileCache, stack_column
from pipeline.manifest import camera_span
from pipeline.rates import aggregate_actions

log = logging.getLogger("featurestore.encode")  # the stage's logger, as before the segment had a module of its own


def _decode_camera(src: SourceInfo, plan: SegmentPlan, cam: int, out: queue.Queue, stop: threading.Event,
                   tolerance_s: float) -> None:
    """Thread body: frames of one camera for every episode of the plan, in order, into `out`."""
    lower_thread_priority()
    frames = PyAVFrameSource(tolerance_s=tolerance_s)
    k = src.camera_index[cam]
    try:
        for e in plan.episodes:
            span = camera_span(src.root, e, k, src.fps)
            try:
                for i, img in enumerate(frames.frames(span)):
                    if stop.is_set():
                        return
                    if i % src.stride == 0:
                        out.put(img)
            except FrameDecodeError as err:
                out.put(EpisodeFailed(int(e["episode_index"]), f"{src.cameras[cam]}: {err}"))
                return
    except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises
        out.put(err)
    finally:
        frames.close()


def _lowdim(src: SourceInfo, plan: SegmentPlan, data: DataFileCache) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("action", "action_valid", "state", "timestamp",
                                                        "episode_index", "frame_index")}
    for e in plan.episodes:
        ep, n = int(e["episode_index"]), int(e["length"])
        try:
            rows = data.rows_in_file(src.root / e["data_file"], ep)
        except (OSError, pa.ArrowException) as err:
            raise EpisodeFailed(ep, f"cannot read {e['data_file']}: {err}") from None
        if len(rows) != n:
            raise EpisodeFailed(ep, f"{e['data_file']} has {len(rows)} rows, manifest says {n}; re-run ingest")
        has = bool(e["has_actions"]) and ACTION_KEY in rows
        keep = np.arange(0, n, src.stride)  # the stored frames
        if not has:
            action, valid = np.full((len(keep), src.action_dim), np.nan), np.zeros(len(keep), dtype=bool)
        elif src.stride == 1:
            action, valid = stack_column(rows, ACTION_KEY), np.ones(n, dtype=bool)
        else:  # one action per stored frame: the skipped frames' actions added up by their kind
            action, valid = aggregate_actions(stack_column(rows, ACTION_KEY), src.stride, src.action_kinds)
        parts["action"].append(action)
        parts["action_valid"].append(valid)
        parts["state"].append(stack_column(rows, STATE_KEY)[keep] if STATE_KEY in rows
                              else np.full((len(keep), src.state_dim), np.nan))
        parts["timestamp"].append(rows["timestamp"].to_numpy(np.float64)[keep])
        parts["episode_index"].append(np.full(len(keep), ep))
        parts["frame_index"].append(keep)
    return {k: np.concatenate(v) for k, v in parts.items()}


def lower_thread_priority(nice: int = 10) -> None:
    """Make the calling helper thread yield the cores to the encoder when both want them.

    On a CPU the encoder's OpenMP threads stall badly when a decode or write thread preempts one of them;
    at a lower priority the helpers run in the encoder's idle gaps and catch up whenever it waits for them.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def _writer_loop(writer, q: queue.Queue, errors: list) -> None:
    lower_thread_priority()
    while (item := q.get()) is not None:
        try:
            writer.add(*item)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)
            return


def encode_one(store: TokenStore, encoder: HFDinoEncoder, src: SourceInfo, plan: SegmentPlan,
               cfg: EncodeConfig, on_frames: Callable[[int], None] | None = None) -> bool:
    """Encode and commit one segment. Raises EpisodeFailed for a bad episode (nothing committed)."""
    C, P, D = len(src.cameras), encoder.grid[0] * encoder.grid[1], encoder.embed_dim
    lowdim = _lowdim(src, plan, DataFileCache(columns=[ACTION_KEY, STATE_KEY]))
    writer = store.begin_segment(src.name, plan.seg_id, frames=plan.frames, cameras=C, tokens=P, dim=D,
                                 action_dim=src.action_dim, state_dim=src.state_dim)
    stop = threading.Event()
    queues = [queue.Queue(maxsize=2 * cfg.batch_size) for _ in range(C)]
    decoders = [threading.Thread(target=_decode_camera, args=(src, plan, c, queues[c], stop, cfg.tolerance_s),
                                 daemon=True, name=f"decode-{c}") for c in range(C)]
    write_q: queue.Queue = queue.Queue(maxsize=4)
    write_errors: list = []
    write_thread = threading.Thread(target=_writer_loop, args=(writer, write_q, write_errors), daemon=True)
    augments = {int(e["episode_index"]): ClipAugment.sample(
        seed=cfg.augment_seed, source=src.name, episode=int(e["episode_index"]), view=plan.view,
        strength=cfg.augment_strength) for e in plan.episodes} if plan.view > 0 else {}
    for t in (*decoders, write_thread):
        t.start()
    committed = False
    try:
        episode_of_frame = np.repeat([int(e["episode_index"]) for e in plan.episodes],
                                     [plan.kept(e) for e in plan.episodes])
        for start in range(0, plan.frames, cfg.batch_size):
            n = min(cfg.batch_size, plan.frames - start)
            imgs = [[_take(queues[c]) for _ in range(n)] for c in range(C)]  # [C][B] of [H, W, 3]
            eps = episode_of_frame[start:start + n]
            patch_CBPD, cls_CBD = _encode_batch(encoder, imgs, eps, augments)
            if write_errors:
                raise write_errors[0]
            write_q.put((start, patch_CBPD.transpose(0, 1).numpy().astype(np.float16),
                         cls_CBD.transpose(0, 1).numpy().astype(np.float16)))
            if on_frames:
                on_frames(n)
        write_q.put(None)
        write_thread.join()
        if write_errors:
            raise write_errors[0]
        attrs = {
            "source": src.name, "segment_id": plan.seg_id, "view": plan.view, "block": plan.block,
            "frames": plan.frames, "cameras": src.cameras, "stride": plan.stride,
            "episodes": _episode_table(plan, augments),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        committed = writer.commit(attrs=attrs, **lowdim)
    finally:
        stop.set()
        if write_thread.is_alive():
            write_q.put(None)
            write_thread.join()
        for q in queues:  # unblock decoders waiting on a full queue
            while not q.empty():
                q.get_nowait()
        for t in decoders:
            t.join(timeout=10)
        if not committed:
            writer.abort()
    return committed


def sample_compression(encoder: HFDinoEncoder, src: SourceInfo, plan: SegmentPlan, cfg: EncodeConfig,
                       frames: int = 32) -> tuple[float, int]:
    """(compressed share of the token arrays, frames sampled): the first `frames` stored frames of the plan's
    first episode, every camera, through the encoder and the store's codec (`token_compression`): what the size
    projected before encoding applies. (1.0, 0) when they do not decode (the episode's failure is reported
    when it is encoded)."""
    from featurestore.store import token_compression

    e = plan.episodes[0]
    imgs = []
    for cam in range(len(src.cameras)):
        source = PyAVFrameSource(tolerance_s=cfg.tolerance_s)
        got: list[np.ndarray] = []
        try:
            for i, img in enumerate(source.frames(camera_span(src.root, e, src.camera_index[cam], src.fps))):
                if i % src.stride == 0:
                    got.append(img)
                if len(got) == frames:
                    break
        except FrameDecodeError:
            return 1.0, 0
        finally:
            source.close()
        imgs.append(got)
    n = min(len(x) for x in imgs)
    if not n:
        return 1.0, 0
    patch_CBPD, cls_CBD = _encode_batch(encoder, [x[:n] for x in imgs], np.zeros(n, dtype=int), {})
    ratio = token_compression(patch_CBPD.transpose(0, 1).float().numpy(), cls_CBD.transpose(0, 1).float().numpy(),
                              cfg.layout)
    return ratio, n


def _take(q: queue.Queue) -> np.ndarray:
    item = q.get()
    if isinstance(item, BaseException):
        raise item
    return item


def _encode_batch(encoder: HFDinoEncoder, imgs: list[list[np.ndarray]], eps: np.ndarray,
                  augments: dict[int, ClipAugment]) -> tuple[torch.Tensor, torch.Tensor]:
    """imgs [C][B] uint8 frames -> patch [C, B, P, D], cls [C, B, D] (float16)."""
    pixels = []
    for cam_imgs in imgs:  # uint8 to the device first: resizing there keeps the CPU free for decoding
        frames_BHWC = torch.from_numpy(np.stack(cam_imgs)).to(encoder.device, non_blocking=True)
        if augments:  # one parameter set per episode: preprocess each episode's run of frames separately
            runs = np.flatnonzero(np.diff(eps)) + 1
            chunks = np.split(np.arange(len(eps)), runs)
            pixels.append(torch.cat([encoder.preprocess(frames_BHWC[idx], augments[int(eps[idx[0]])])
                                     for idx in chunks]))
        else:
            pixels.append(encoder.preprocess(frames_BHWC))
    C, B = len(imgs), len(imgs[0])
    out = encoder.forward_preprocessed(torch.cat(pixels), dtype=torch.float16)  # [C*B, ...], the store's float16
    return out["patch"].view(C, B, *out["patch"].shape[1:]), out["cls"].view(C, B, -1)


def _episode_table(plan: SegmentPlan, augments: dict[int, ClipAugment]) -> list[dict[str, Any]]:
    table, start = [], 0
    for e in plan.episodes:
        ep = int(e["episode_index"])
        table.append({
            "episode_index": ep, "view": plan.view, "start": start, "length": plan.kept(e),
            "split": e["split"], "has_actions": bool(e["has_actions"]), "task": e["task"],
            "augment": augments[ep].to_dict() if ep in augments else None,
        })
        start += plan.kept(e)
    return table


def encode_segment(store: TokenStore, encoder: HFDinoEncoder, src: SourceInfo, plan: SegmentPlan,
                   cfg: EncodeConfig, on_frames: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode a segment, recording bad episodes as failed and redoing the segment without them."""
    failures = []
    counted = [0]

    def report(n: int) -> None:
        counted[0] += n
        if on_frames:
            on_frames(n)

    while plan.episodes:
        try:
            committed = encode_one(store, encoder, src, plan, cfg, report)
            return {"segment": plan.seg_id, "committed": committed, "frames": plan.frames, "failures": failures}
        except EpisodeFailed as e:
            report(-counted[0])  # the redo counts its frames again: take back what the failed attempt counted
            log.warning("%s episode %d (view %d) failed, re-doing its segment without it: %s",
                        src.name, e.episode, plan.view, e.reason)
            store.record_failure(src.name, e.episode, plan.view, e.reason)
            failures.append((src.name, e.episode, plan.view, e.reason))
            plan = plan.without(e.episode)
    return {"segment": None, "committed": False, "frames": 0, "failures": failures}
