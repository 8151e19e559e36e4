"""`wmctl ingest`: validate every episode of a LeRobot v3.0 dataset and write a Parquet manifest.

One manifest row per episode: where its frames are (data file, per camera video file and time range),
whether it has usable actions, a deterministic train/val split, and `status` ok/failed with the reason.
Every later stage reads the manifest, never the raw metadata (its contract: `pipeline.manifest`). The config is
`pipeline.ingest_config`; one episode's checks and split, `pipeline.episodes`; this module runs the stage.

Work unit: a block of `block_size` consecutive episodes, written atomically to `<out>.parts/`; a
relaunch skips finished blocks; `--shard I/N` takes blocks b with b % N == I. Whoever finds all blocks
done merges them into the manifest (the commit), under an exclusive lock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.episodes import ACTION_KEY, STATE_KEY, check_groups, exact_val_episodes, validate_episode
from pipeline.frames import PyAVFrameSource, VideoProber
from pipeline.ingest_config import IngestConfig
from pipeline.lerobot_io import DataFileCache, DatasetMeta, check_dataset_root, open_meta
from pipeline.manifest import MANIFEST_META_KEY, manifest_table, read_manifest, video_fingerprint, write_parquet
from pipeline.names import safe_component
from pipeline.stage import (
    ConfigMismatchError,
    UserError,
    atomic_write_json,
    config_differences,
    fault_point,
    is_stale,
    owner_tag,
    read_json,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class IngestResult:
    manifest: Path | None  # None when this shard finished its blocks but others are still running
    n_ok: int
    n_failed: int
    failures: list[tuple[int, str]]
    nothing_to_do: bool = False
    blocks_done_here: int = 0
    seconds: float = 0.0


def _fingerprints(table: pa.Table) -> dict[str, dict[str, Any]]:
    """The fingerprint of every video file the manifest rows name (those that exist; a missing one fails its
    episodes anyway)."""
    out: dict[str, dict[str, Any]] = {}
    for root, files in zip(table.column("root").to_pylist(), table.column("video_files").to_pylist()):
        for rel in files or ():
            if rel not in out and (Path(root) / rel).is_file():
                out[rel] = video_fingerprint(Path(root) / rel)
    return out


def _parts_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.parts"


def _refuse_unless_manifest(path: Path) -> None:
    """--force deletes only a manifest wmctl wrote (a Parquet file with wmctl metadata), never another file."""
    try:
        ours = path.is_file() and not path.is_symlink() and MANIFEST_META_KEY in (pq.read_schema(path).metadata or {})
    except (pa.ArrowException, OSError):
        ours = False
    if not ours:
        raise UserError(f"{path} is not a manifest wmctl wrote (or is damaged); --force replaces only wmctl's own "
                        "manifests: choose another --out, or remove it yourself if it is yours")


def _check_existing(cfg: IngestConfig, identity: dict[str, Any], info_sha: str) -> IngestResult | None:
    """Return the 'nothing to do' result, refuse a changed config, or clear outputs under --force."""
    out, parts = Path(cfg.out), _parts_dir(Path(cfg.out))
    if cfg.force:
        if out.exists() or out.is_symlink():
            _refuse_unless_manifest(out)
            out.unlink()
        shutil.rmtree(parts, ignore_errors=True)
        return None
    expected = {"config": identity, "info_sha256": info_sha}
    if out.exists():
        df, meta = read_manifest(out)
        got = {"config": meta["config"], "info_sha256": meta.get("info_sha256")}
        if got != expected:
            raise ConfigMismatchError(f"manifest {out}", config_differences(got, expected),
                                      "Re-run with --force to rebuild it, or write to another --out.")
        if parts.exists():  # left by a merger killed after its commit, or by a shard that finished after it
            log.info("removing %s: %s is committed", parts, out)
            shutil.rmtree(parts, ignore_errors=True)
        failed = df[df.status != "ok"]
        return IngestResult(out, int((df.status == "ok").sum()), len(failed),
                            list(zip(failed.episode_index.astype(int), failed.reason)), nothing_to_do=True)
    cfg_file = parts / "config.json"
    if cfg_file.exists():
        got = read_json(cfg_file)
        if got != expected:
            raise ConfigMismatchError(f"the unfinished ingest in {parts}", config_differences(got, expected),
                                      "Re-run with --force to start over.")
    else:
        atomic_write_json(cfg_file, expected)
    return None


def _try_merge(cfg: IngestConfig, n_blocks: int, manifest_meta: dict[str, Any]) -> bool:
    """Merge all block files into the manifest if every block is done. True when the manifest exists."""
    out, parts = Path(cfg.out), _parts_dir(Path(cfg.out))
    blocks = [parts / f"block-{b:06d}.parquet" for b in range(n_blocks)]
    if not all(p.exists() for p in blocks):
        return False
    lock = parts / "merge.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, owner_tag().encode())
        os.close(fd)
    except FileExistsError:
        holder = lock.read_text() if lock.exists() else ""
        if holder and is_stale(holder, lock):
            lock.unlink(missing_ok=True)
            return _try_merge(cfg, n_blocks, manifest_meta)
        log.info("another process is merging %s", out)
        return out.exists()
    table = pa.concat_tables([pq.read_table(p) for p in blocks])
    df = table.to_pandas()
    manifest_meta["counts"] = {"ok": int((df.status == "ok").sum()), "failed": int((df.status != "ok").sum())}
    manifest_meta["video_fingerprints"] = _fingerprints(table)
    write_parquet(out, table.replace_schema_metadata({MANIFEST_META_KEY: json.dumps(manifest_meta).encode()}))
    fault_point("ingest-merged")
    shutil.rmtree(parts, ignore_errors=True)  # the manifest is committed: the blocks are leftovers now
    return True


def _chosen_cameras(cfg: IngestConfig, meta: DatasetMeta) -> list[str]:
    """The camera keys to ingest (`cfg.cameras`, default every video feature), each a safe name the dataset has;
    also refuses a --split-by column the dataset lacks."""
    available = meta.video_keys
    cameras = list(cfg.cameras) or available
    for cam in cameras:  # a camera key becomes a folder name in the dataset's video path
        safe_component(cam, f"camera key in {Path(cfg.root) / 'meta' / 'info.json'}",
                       "Ingest the other cameras (--cameras), or rename the feature.")
    unknown = [c for c in cameras if c not in available]
    if unknown:
        raise UserError(f"{cfg.root}: unknown camera key(s) {unknown}; the dataset has {available}")
    if not cameras:
        raise UserError(f"{cfg.root}: the dataset has no video features; wmctl needs camera videos")
    if cfg.split_by and cfg.split_by != "task" and not cfg.split_by.startswith("task:") and \
            cfg.split_by not in meta.episodes.columns:
        columns = sorted(c for c in meta.episodes.columns if not c.startswith(("stats/", "data/", "videos/")))
        raise UserError(f"--split-by {cfg.split_by!r}: {cfg.root} has no such per-episode column; it has "
                        f"{columns}, or use task / task:REGEX (e.g. 'task:scene (\\d+)')")
    return cameras


def run_ingest(cfg: IngestConfig, on_episode: Callable[[], None] | None = None) -> IngestResult:
    """Validate the episodes of `cfg.root` (this shard's blocks) and write the manifest when complete."""
    start = time.monotonic()
    check_dataset_root(cfg.root)
    meta = open_meta(cfg.root, cfg.repo_id)
    cameras = _chosen_cameras(cfg, meta)
    identity = dict(cfg.identity(), cameras=cameras)
    done = _check_existing(cfg, identity, meta.info_sha256)
    if done is not None:
        return done

    n_blocks = max(1, -(-len(meta.episodes) // cfg.block_size))
    parts = _parts_dir(Path(cfg.out))
    done_here = _validate_blocks(cfg, meta, cameras, n_blocks, parts, on_episode)

    manifest_meta = {
        "config": identity,
        "info_sha256": meta.info_sha256,
        "codebase_version": meta.version,
        "fps": meta.fps,
        "video_keys": meta.video_keys,
        "features": {k: {"dtype": v.get("dtype"), "shape": list(v.get("shape", []))} for k, v in meta.features.items()},
        "wmctl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    merged = _try_merge(cfg, n_blocks, manifest_meta)
    if merged:
        df, _ = read_manifest(cfg.out)
    else:
        done = [pq.read_table(p).to_pandas() for p in sorted(parts.glob("block-*.parquet"))]
        # a shard that owns no block (a SLURM array wider than the blocks) has nothing to count
        df = pd.concat(done) if done else pd.DataFrame({"status": [], "episode_index": [], "reason": []})
    check_groups(df)
    failed = df[df.status != "ok"]
    return IngestResult(
        manifest=Path(cfg.out) if merged else None,
        n_ok=int((df.status == "ok").sum()),
        n_failed=len(failed),
        failures=list(zip(failed.episode_index.astype(int), failed.reason)),
        blocks_done_here=done_here,
        seconds=time.monotonic() - start,
    )


def _validate_blocks(cfg: IngestConfig, meta: DatasetMeta, cameras: list[str], n_blocks: int, parts: Path,
                     on_episode: Callable[[], None] | None) -> int:
    """Validate this shard's blocks not yet done, each written to `parts` as one Parquet file; how many it wrote."""
    episodes = meta.episodes
    val_set = exact_val_episodes(cfg.source, [int(e) for e in episodes.episode_index], cfg.val_episodes,
                                 cfg.split_seed) if cfg.val_episodes else None
    data = DataFileCache(columns=[ACTION_KEY, STATE_KEY])
    prober = VideoProber(tolerance_s=cfg.tolerance_s)
    frames = PyAVFrameSource(tolerance_s=cfg.tolerance_s) if cfg.video_check == "full" else None
    done_here = 0
    try:
        for b in range(n_blocks):
            block_path = parts / f"block-{b:06d}.parquet"
            if not cfg.shard.owns(b) or block_path.exists():
                continue
            rows = []
            for _, row in episodes.iloc[b * cfg.block_size:(b + 1) * cfg.block_size].iterrows():
                rows.append(validate_episode(meta, row, cfg, cameras, data, prober, frames, val_set))
                if on_episode:
                    on_episode()
            write_parquet(block_path, manifest_table(rows))
            done_here += 1
            fault_point("ingest-block")
    finally:
        prober.close()
        if frames is not None:
            frames.close()
    return done_here
