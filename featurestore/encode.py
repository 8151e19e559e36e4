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

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from featurestore.encode_plan import (
    EncodeConfig,
    EncodeResult,
    SegmentPlan,
    SourceInfo,
    plan_segments,
    source_info,
)
from featurestore.encode_segment import encode_segment, sample_compression
from featurestore.encode_store import _open_store, check_space
from featurestore.encoders import HFDinoEncoder
from featurestore.store import TokenStore, projected_bytes
from pipeline.executors import map_on_dask
from pipeline.manifest import check_videos
from pipeline.names import inside
from pipeline.rates import action_kinds, stride_for
from pipeline.registry import spec_of_source
from pipeline.stage import UserError, file_sha256, fingerprint

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- the stage
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
