"""`wmctl encode`: every camera frame of a manifest through a frozen encoder into the token store.

Work unit: a segment = the pending episodes of one block of `episodes_per_segment` consecutive episode
indices (and one augmentation view). The plan is a pure function of the manifest and of what the store
has committed or recorded as failed, so independent processes agree on it without talking: `--shard I/N`
takes segments whose (block + view) % N == I, a Dask cluster maps the same unit, and a relaunch skips
committed segments. Appending episodes later yields new segments; committed ones are never rewritten.

Inside a segment the work is pipelined: one decode thread per camera (sequential PyAV), encoder batches
on the main thread, and a writer thread that writes each array shard once, whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from featurestore.augment import ClipAugment
from featurestore.encoders import DEFAULT_ENCODER, HFDinoEncoder, Preprocess
from featurestore.store import STORE_KEY, StoreLayout, TokenStore, projected_bytes
from pipeline.executors import map_on_dask
from pipeline.frames import FrameDecodeError, PyAVFrameSource
from pipeline.lerobot_io import DataFileCache, stack_column
from pipeline.machine import resolve_device
from pipeline.manifest import camera_span, check_videos
from pipeline.names import inside
from pipeline.rates import action_kinds, aggregate_actions, stride_for
from pipeline.registry import spec_of_source
from pipeline.stage import NoSpaceError, ShardSpec, UserError, file_sha256, fingerprint

log = logging.getLogger(__name__)

ACTION_KEY, STATE_KEY = "action", "observation.state"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    manifest: Path
    store: Path
    encoder: str = DEFAULT_ENCODER
    cameras: tuple[str, ...] = ()  # subset of the manifest's cameras, in this order (default: all)
    preprocess: Preprocess = Preprocess()
    layout: StoreLayout = StoreLayout()
    batch_size: int = 32  # frames per encoder batch (x cameras images)
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    augment_views: int = 0  # extra augmented views per episode (view 0 is the original)
    augment_strength: float = 0.5
    augment_seed: int = 0
    shard: ShardSpec = ShardSpec()
    dask: str | None = None  # None, "local" or a scheduler address
    dask_workers: int = 2
    retry_failed: bool = False
    repair: bool = False  # re-encode the committed segments that fail to read back (checksum, missing chunks)
    force: bool = False
    tolerance_s: float = 1e-4
    fps: float | None = None  # store every k-th frame, k = the dataset's fps / fps (None: every frame)
    action_kind: str | tuple[str, ...] = ""  # how actions add up over skipped frames (default: the registry's)
    force_space: bool = False  # encode even when the projected size exceeds the store's free disk space

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.augment_views < 0:
            raise UserError("--batch-size must be >= 1 and --augment-views >= 0")
        if (self.force or self.repair) and self.shard.count > 1:
            raise UserError("--force and --repair delete what other shards may read or write: run them once without "
                            "--shard, then launch shards")

    def resolved_device(self) -> str:
        """`device` on this machine (`pipeline.machine.resolve_device`; a Dask worker resolves it on its own)."""
        return str(resolve_device(self.device))


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    source: str
    view: int
    block: int
    episodes: tuple[dict[str, Any], ...]  # manifest rows (plain dicts)
    stride: int = 1  # every stride-th frame of each episode is stored

    @property
    def seg_id(self) -> str:
        eps = ",".join(str(e["episode_index"]) for e in self.episodes)
        return f"v{self.view}-b{self.block:06d}-{hashlib.sha256(eps.encode()).hexdigest()[:8]}"

    def kept(self, e: dict[str, Any]) -> int:
        """Frames stored of an episode: 0, stride, 2 * stride, ..."""
        return -(-int(e["length"]) // self.stride)

    @property
    def frames(self) -> int:
        return sum(self.kept(e) for e in self.episodes)

    def without(self, episode: int) -> SegmentPlan:
        return dataclasses.replace(self, episodes=tuple(e for e in self.episodes if e["episode_index"] != episode))


@dataclasses.dataclass
class EncodeResult:
    segments_committed: int = 0
    frames: int = 0
    failures: list[tuple[str, int, int, str]] = dataclasses.field(default_factory=list)  # source, ep, view, why
    nothing_to_do: bool = False
    pending_segments: int = 0  # this shard's
    pending_all_shards: int = 0
    seconds: float = 0.0
    projected_bytes: int = 0  # this shard's pending frames at the store's layout, uncompressed (before encoding)
    estimated_bytes: int = 0  # the same with the tokens' compression measured on a sample (before encoding)
    bytes_written: int = 0  # the size on disk of the segments this run committed


class EpisodeFailed(Exception):
    def __init__(self, episode: int, reason: str):
        self.episode, self.reason = episode, reason
        super().__init__(f"episode {episode}: {reason}")


# --------------------------------------------------------------------------------------------- planning
def _plain(row: pd.Series) -> dict[str, Any]:
    d = row.to_dict()
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def plan_segments(manifest: pd.DataFrame, store: TokenStore, source: str, layout: StoreLayout,
                  views: int, stride: int = 1) -> list[SegmentPlan]:
    """Segments still to encode: per view, the ok episodes not committed and not failed, by block."""
    done = {(e["episode_index"], seg["view"]) for seg in store.committed_segments(source).values()
            for e in seg["episodes"]}
    failed = {(f["episode_index"], f["view"]) for f in store.failed(source).values()}
    ok = manifest[manifest.status == "ok"].sort_values("episode_index")
    plans = []
    for view in range(views):
        pending = [_plain(r) for _, r in ok.iterrows()
                   if (int(r.episode_index), view) not in done | failed]
        blocks: dict[int, list[dict]] = {}
        for e in pending:
            blocks.setdefault(int(e["episode_index"]) // layout.episodes_per_segment, []).append(e)
        plans += [SegmentPlan(source, view, b, tuple(eps), stride) for b, eps in sorted(blocks.items())]
    return plans


# ----------------------------------------------------------------------------------------- one segment
@dataclasses.dataclass
class SourceInfo:
    """What the encode of one source needs besides the plan."""

    name: str
    root: Path
    fps: float
    cameras: list[str]
    camera_index: list[int]  # positions of `cameras` in the manifest rows' camera_keys
    action_dim: int
    state_dim: int
    stride: int = 1  # frames stored: every stride-th
    action_kinds: tuple[str, ...] = ()  # per action dimension, when stride > 1 and the source has actions


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


# --------------------------------------------------------------------------------------------- the stage
def source_info(manifest: pd.DataFrame, meta: dict[str, Any], cameras: tuple[str, ...]) -> SourceInfo:
    sources = manifest.source.unique()
    if len(sources) != 1:
        raise UserError(f"a manifest must hold one source, this one has {list(sources)}")
    ok = manifest[manifest.status == "ok"]
    if ok.empty:
        raise UserError("the manifest has no ok episodes; fix the failed ones and re-run ingest")
    keys = list(ok.iloc[0].camera_keys)
    chosen = list(cameras) or keys
    missing = [c for c in chosen if c not in keys]
    if missing:
        raise UserError(f"--cameras {missing} are not in the manifest (it has {keys}); re-run ingest with them")
    return SourceInfo(
        name=str(sources[0]), root=Path(ok.iloc[0].root), fps=float(meta["fps"]), cameras=chosen,
        camera_index=[keys.index(c) for c in chosen], action_dim=int(ok.action_dim.max()),
        state_dim=int(ok.state_dim.max()),
    )


def _provenance(cfg: EncodeConfig, src: SourceInfo, manifest_meta: dict[str, Any], manifest_sha: str,
                has_actions: bool) -> dict[str, Any]:
    rate = {}  # only for a source stored at a lower rate: stores of every frame keep their provenance
    if src.stride > 1:
        rate = {"stride": src.stride, "stored_fps": src.fps / src.stride, "action_kind": list(src.action_kinds)}
    return {**rate,
        "source": src.name, "repo_id": manifest_meta["config"]["repo_id"], "root": str(src.root),
        "codebase_version": manifest_meta.get("codebase_version"), "fps": src.fps,
        "info_sha256": manifest_meta.get("info_sha256"), "cameras": src.cameras,
        "action_dim": src.action_dim, "state_dim": src.state_dim, "has_actions": has_actions,
        "manifest": str(Path(cfg.manifest).resolve()), "manifest_sha256": manifest_sha,
        "augment": {"views": cfg.augment_views, "strength": cfg.augment_strength, "seed": cfg.augment_seed},
    }


FIXED_SOURCE_KEYS = ("repo_id", "root", "fps", "cameras", "augment", "action_dim", "state_dim", "stride",
                     "action_kind")


def _open_store(cfg: EncodeConfig, encoder: HFDinoEncoder) -> TokenStore:
    """Open or create the store; with --force, delete and recreate a wmctl token store made with another encoder,
    layout or schema (never a folder or Zarr group that is not a token store: refused, named)."""
    import shutil

    recorded = TokenStore.recorded_encoder(cfg.store)  # an existing store's: its hash of these weights is kept
    try:
        return TokenStore.create_or_open(cfg.store, encoder.identity(recorded), cfg.layout, encoder.location)
    except UserError as e:
        if not cfg.force:
            raise
        attrs = token_store_attrs(cfg.store)
        if attrs is None:
            raise UserError(f"{cfg.store} is not a wmctl token store (no {STORE_KEY} attribute in its zarr.json): "
                            "--force replaces only token stores wmctl wrote; choose another --store") from None
        log.warning("--force: deleting token store %s (%s)", cfg.store,
                    replace_reason(attrs, encoder.identity(recorded), cfg.layout) or e)
        shutil.rmtree(cfg.store)
    return TokenStore.create_or_open(cfg.store, encoder.identity(), cfg.layout, encoder.location)


def token_store_attrs(path: Path) -> dict[str, Any] | None:
    """The root attributes of the wmctl token store at `path` (`STORE_KEY`); None when it is not one (no zarr.json,
    another Zarr group, a link)."""
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes") if meta.is_file() and not Path(path).is_symlink() \
            else None
    except (OSError, ValueError, AttributeError):
        return None
    found = attrs.get(STORE_KEY) if isinstance(attrs, dict) else None
    return found if isinstance(found, dict) else None


def replace_reason(attrs: dict[str, Any], encoder: dict[str, Any], layout: StoreLayout) -> str:
    """Why a store with root attributes `attrs` is not the one wanted, in words: another schema, or made with
    another encoder (by identity, the weights, not their name) and/or layout, with the fields that differ."""
    from featurestore.encoders import identity_key
    from featurestore.store import SCHEMA_VERSION
    from pipeline.stage import config_differences

    if attrs.get("schema_version") != SCHEMA_VERSION:
        return f"store schema {attrs.get('schema_version')}, this wmctl writes {SCHEMA_VERSION}"
    have = identity_key(attrs.get("encoder") or {})
    want = json.loads(json.dumps(identity_key(encoder)))
    parts = {"encoder": config_differences(have, want, prefix="encoder."),
             "layout": config_differences(attrs.get("layout") or {}, dataclasses.asdict(layout), prefix="layout.")}
    kinds = [k for k, d in parts.items() if d]
    if not kinds:
        return ""
    return f"made with another {' and '.join(kinds)}: {'; '.join(parts['encoder'] + parts['layout'])}"


def prepare(cfg: EncodeConfig
            ) -> tuple[TokenStore, HFDinoEncoder, SourceInfo, list[SegmentPlan], list[SegmentPlan]]:
    """Load manifest and encoder, open/create the store, and plan this shard's segments (and every shard's
    pending ones)."""
    import shutil

    from pipeline.manifest import read_manifest

    manifest, mmeta = read_manifest(cfg.manifest)
    src = source_info(manifest, mmeta, cfg.cameras)
    src.stride = stride_for(src.fps, cfg.fps, src.name)
    if src.stride > 1 and bool(manifest.has_actions.any()):
        spec = spec_of_source(src.name)
        src.action_kinds = action_kinds(cfg.action_kind or (spec.action_kind if spec else ""), src.action_dim,
                                        src.name)
    info = src.root / "meta" / "info.json"
    if not info.is_file() or file_sha256(info) != mmeta.get("info_sha256"):
        raise UserError(f"{src.root} changed since {cfg.manifest} was written (meta/info.json differs or is gone): "
                        "re-run `wmctl ingest --force` for it first")
    check_videos(cfg.manifest, manifest, mmeta, src.camera_index)
    # the source's folder in the store: a symlink there must not lead the writes (or --force's delete) out of it
    inside(cfg.store, f"sources/{src.name}", f"source {src.name!r} of {cfg.manifest}",
           f"{cfg.store}/sources/{src.name} must be the store's own folder: remove the link or use another --store.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    encoder = HFDinoEncoder(cfg.encoder, preprocess=cfg.preprocess, device=cfg.resolved_device())
    store = _open_store(cfg, encoder)
    prov = _provenance(cfg, src, mmeta, file_sha256(cfg.manifest), bool(manifest.has_actions.any()))
    try:
        store.ensure_source(src.name, prov, fixed_keys=FIXED_SOURCE_KEYS)
    except UserError as e:
        if not cfg.force:
            raise
        log.warning("--force: deleting source %s from %s (made with another config: %s)", src.name, cfg.store,
                    "; ".join(getattr(e, "differences", [])) or e)
        shutil.rmtree(store.source_dir(src.name))
        store.ensure_source(src.name, prov, fixed_keys=FIXED_SOURCE_KEYS)
    if (n := store.clean_stale_staging(src.name)):
        log.info("removed %d stale staging segment(s) of dead writers", n)
    if cfg.retry_failed:
        store.clear_failures(src.name)
    if cfg.repair:
        from featurestore.status import verify_store

        for d in verify_store(cfg.store, [src.name]):
            log.warning("--repair: %s/%s is damaged (%s): re-encoding its episodes %s", d["source"], d["segment"],
                        d["problem"], d["episodes"])
            shutil.rmtree(store.source_dir(src.name) / "segments" / d["segment"])
    plans = plan_segments(manifest, store, src.name, cfg.layout, 1 + cfg.augment_views, src.stride)
    mine = [p for p in plans if cfg.shard.owns(p.block + p.view)]
    return store, encoder, src, mine, plans


def run_encode(cfg: EncodeConfig, on_frames: Callable[[int], None] | None = None,
               on_plan: Callable[[int], None] | None = None) -> EncodeResult:
    """Encode this shard's pending segments (locally or over Dask). Idempotent and resumable."""
    t0 = time.monotonic()
    store, encoder, src, plans, every_shard = prepare(cfg)
    result = EncodeResult(pending_segments=len(plans), pending_all_shards=len(every_shard))
    frames = sum(p.frames for p in plans)
    if on_plan:
        on_plan(frames)
    if not plans:
        result.nothing_to_do = True
        return result
    grid = encoder.grid
    schema = dict(cameras=len(src.cameras), tokens=grid[0] * grid[1], dim=encoder.embed_dim, dtype=cfg.layout.dtype,
                  action_dim=src.action_dim, state_dim=src.state_dim)
    result.projected_bytes = projected_bytes(frames, **schema)
    check_space(cfg, src, every_shard, schema)
    ratio, sampled = sample_compression(encoder, src, plans[0], cfg)
    result.estimated_bytes = projected_bytes(frames, **schema, token_ratio=ratio)
    log.info("%s: %d frames x %d camera(s) x %dx%d tokens x %d at %s: projected %.3f GB uncompressed, about %.3f GB "
             "on disk (the store's codec takes the tokens to %.0f%% on %d sampled frames)", src.name, frames,
             len(src.cameras), grid[0], grid[1], encoder.embed_dim, cfg.layout.dtype, result.projected_bytes / 1e9,
             result.estimated_bytes / 1e9, 100 * ratio, sampled)
    if cfg.dask:
        outcomes: Iterator[dict[str, Any]] = _reporting(
            map_on_dask(encode_task, plans, address=cfg.dask, workers=cfg.dask_workers, cfg=cfg), on_frames)
    else:
        outcomes = (encode_segment(store, encoder, src, p, cfg, on_frames) for p in plans)
    for out in outcomes:
        result.segments_committed += int(out["committed"])
        result.frames += out["frames"] if out["committed"] else 0
        if out["committed"]:  # its own files only (not a walk of every file of every segment of the source)
            result.bytes_written += store.disk_bytes(src.name, out["segment"])
        result.failures += [tuple(f) for f in out["failures"]]
    result.seconds = time.monotonic() - t0
    return result


# ------------------------------------------------------------------------------------------ free disk space
def check_space(cfg: EncodeConfig, src: SourceInfo, every_shard: list[SegmentPlan], schema: dict[str, Any]) -> None:
    """Refuse an encode whose projected size (`projected_bytes`, uncompressed, of every shard's pending frames: the
    shards share the store's disk) exceeds the free space of the store's file system, unless `force_space`. The
    refusal names the size, the free space and the rates and dtypes that would fit."""
    lengths = np.array([int(e["length"]) for p in every_shard for e in p.episodes], dtype=np.int64)

    def frames_at(stride: int) -> int:  # frames stored of every pending episode at that stride
        return int((-(-lengths // stride)).sum())

    need = projected_bytes(frames_at(src.stride), **schema)
    probe = Path(cfg.store).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need <= free:
        return
    what = (f"{cfg.store}: the encode of {src.name} projects {_size(need)} ({frames_at(src.stride):,} frames at "
            f"{schema['dtype']}, uncompressed, all shards) but {probe}'s file system has {_size(free)} free")
    if cfg.force_space:
        log.warning("%s; --force-space: encoding anyway", what)
        return
    fits = []
    for dtype in dict.fromkeys((schema["dtype"], "int8")):
        for k in range(src.stride, max(src.stride, int(src.fps)) + 1):  # down to about 1 frame per second
            size = projected_bytes(frames_at(k), **{**schema, "dtype": dtype})
            if size <= free:
                fits.append(f"--fps {src.fps / k:g}{' --dtype int8' if dtype == 'int8' else ''} ({_size(size)})")
                break
    hint = f"it fits at {' or '.join(fits)}" if fits else "no rate or dtype fits"
    if any("int8" in f for f in fits):
        hint += " (a store's dtype is set when it is made: int8 needs a new --store)"
    raise NoSpaceError(f"{what}: no space left on the device for it; {hint}; or free space (or choose a store on a "
                       "disk with room), or pass --force-space")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return ""


# ------------------------------------------------------------------------------------------ on a Dask cluster
_WORKER_STATE: dict[str, Any] = {}


def _worker_state(cfg: EncodeConfig) -> tuple[TokenStore, HFDinoEncoder, SourceInfo]:
    """Per worker process: the store, the encoder (loaded once) and the source, for this config."""
    key = fingerprint(cfg)
    if key not in _WORKER_STATE:
        store, encoder, src, _, _ = prepare(cfg)
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (store, encoder, src)
    return _WORKER_STATE[key]


def encode_task(plan: SegmentPlan, cfg: EncodeConfig) -> dict[str, Any]:
    """One segment on a Dask worker (idempotent: a segment committed meanwhile is skipped)."""
    store, encoder, src = _worker_state(cfg)
    if plan.seg_id in store.committed_segments(src.name):
        return {"segment": plan.seg_id, "committed": False, "frames": 0, "failures": []}
    return encode_segment(store, encoder, src, plan, cfg)


def _reporting(outcomes: Iterator[dict[str, Any]], on_frames: Callable[[int], None] | None
               ) -> Iterator[dict[str, Any]]:
    for out in outcomes:
        if on_frames:
            on_frames(out["frames"])
        yield out
