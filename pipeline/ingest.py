"""`wmctl ingest`: validate every episode of a LeRobot v3.0 dataset and write a Parquet manifest.

One manifest row per episode: where its frames are (data file, per camera video file and time range),
whether it has usable actions, a deterministic train/val split, and `status` ok/failed with the reason.
Every later stage reads the manifest, never the raw metadata.

Work unit: a block of `block_size` consecutive episodes, written atomically to `<out>.parts/`; a
relaunch skips finished blocks; `--shard I/N` takes blocks b with b % N == I. Whoever finds all blocks
done merges them into the manifest (the commit), under an exclusive lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.frames import PyAVFrameSource, VideoProber, VideoSpan
from pipeline.lerobot_io import DataFileCache, DatasetMeta, check_dataset_root, open_meta, stack_column
from pipeline.names import safe_component, safe_relative
from pipeline.registry import SourceRef
from pipeline.stage import (
    ConfigMismatchError,
    ShardSpec,
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    config_differences,
    fault_point,
    is_stale,
    owner_tag,
    read_json,
    to_jsonable,
)

log = logging.getLogger(__name__)

ACTION_KEY = "action"
STATE_KEY = "observation.state"
VIDEO_CHECKS = ("ends", "full", "none")
MANIFEST_META_KEY = b"wmctl"


@dataclasses.dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """source: dataset name (registry name, or the root's folder name). cameras: empty = all videos.
    use_actions: False ingests as action-free even if an action feature exists. video_check: `ends`
    decodes each episode's first and last frame per camera, `full` every frame, `none` only checks files.
    """

    source: str
    root: Path
    repo_id: str
    out: Path
    cameras: tuple[str, ...] = ()
    use_actions: bool = True
    val_fraction: float = 0.1
    val_episodes: int = 0  # > 0: exactly this many whole episodes held out (the hash order's first), not a share
    split_seed: int = 0
    split_by: str = ""  # "" (each episode its own group) | a per-episode metadata column | task | task:REGEX
    tolerance_s: float = 1e-4
    video_check: str = "ends"
    block_size: int = 256
    shard: ShardSpec = ShardSpec()
    force: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.val_episodes < 0 or (self.val_episodes and self.split_by):
            raise UserError(f"--val-episodes {self.val_episodes}: must be >= 0, and holds out whole episodes (not "
                            "with --split-by, whose groups --val-fraction splits)")
        if self.video_check not in VIDEO_CHECKS:
            raise UserError(f"--video-check {self.video_check!r}: choose one of {VIDEO_CHECKS}")
        if self.tolerance_s <= 0 or self.block_size < 1:
            raise UserError("--tolerance-s must be > 0 and block_size >= 1")
        if self.split_by.startswith("task:"):
            try:
                re.compile(self.split_by[5:])
            except re.error as e:
                raise UserError(f"--split-by {self.split_by!r}: not a regular expression ({e}); e.g. "
                                "'task:scene (\\d+)'") from None
        # names that later stages join to paths (the store's sources/<source>, the camera folders of a dataset)
        safe_component(self.source, f"source name of {self.root}", "Rename the dataset folder, or register it "
                       "under a safe name (registry/<name>.toml with root = ...) and ingest --dataset <name>.")
        safe_relative(self.repo_id, "repo id", "Give --repo-id org/name.", max_parts=2)
        for cam in self.cameras:
            safe_component(cam, "camera key", "Name the cameras as the dataset's meta/info.json does.")

    def identity(self) -> dict[str, Any]:
        """The fields that decide the manifest's content (not where it goes or how work is split)."""
        keys = ("source", "repo_id", "cameras", "use_actions", "val_fraction", "split_seed", "tolerance_s",
                "video_check")
        d = {k: to_jsonable(getattr(self, k)) for k in keys}
        if self.split_by:  # absent when unset, so manifests made before group splits stay up to date
            d["split_by"] = self.split_by
        if self.val_episodes:  # likewise
            d["val_episodes"] = self.val_episodes
            del d["val_fraction"]
        d["root"] = str(Path(self.root).resolve())
        return d


def manifest_path(dataset: str | None, manifest: Path | None) -> Path:
    """`--dataset NAME` (its manifest under manifests/, which must exist) or `--manifest PATH`, exactly one."""
    if bool(dataset) == bool(manifest):
        raise UserError("give exactly one of --dataset NAME or --manifest PATH")
    if manifest is not None:
        return manifest
    path = Path("manifests") / f"{safe_component(dataset, '--dataset', 'See `wmctl datasets`.')}.parquet"
    if not path.exists():
        raise UserError(f"{path} does not exist: run `wmctl ingest --dataset {dataset}` first")
    return path


def ingest_config(src: SourceRef, *, out: Path | None = None, cameras: tuple[str, ...] = (),
                  no_actions: bool = False, val_fraction: float | None = None, split_by: str | None = None,
                  **fields: Any) -> IngestConfig:
    """The ingest config of a source: flags given win, then its registry entry, then the config's defaults."""
    spec = src.spec
    return IngestConfig(
        source=src.name, root=src.root, repo_id=src.repo_id, out=out or Path("manifests") / f"{src.name}.parquet",
        cameras=cameras or (spec.cameras if spec else ()),
        use_actions=not no_actions and (spec.use_actions if spec else True),
        val_fraction=val_fraction if val_fraction is not None else (spec.val_fraction if spec else
                                                                    IngestConfig.val_fraction),
        split_by=split_by if split_by is not None else (spec.split_by if spec else ""),
        **fields)


@dataclasses.dataclass
class IngestResult:
    manifest: Path | None  # None when this shard finished its blocks but others are still running
    n_ok: int
    n_failed: int
    failures: list[tuple[int, str]]
    nothing_to_do: bool = False
    blocks_done_here: int = 0
    seconds: float = 0.0


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


def split_summary(manifest: Path) -> str:
    """One line: how the manifest was split, and how many episodes (and groups) each split has."""
    df, meta = read_manifest(manifest)
    key = meta["config"].get("split_by", "")
    ok = df[df.status == "ok"]
    parts = []
    for split in ("train", "val"):
        rows = ok[ok.split == split]
        groups = f", {rows.split_group.nunique()} groups" if key and "split_group" in rows else ""
        parts.append(f"{split} {len(rows)} episodes{groups}")
    return f"split by {key or 'episode'}: " + "; ".join(parts)


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
    # low-dim data: frame count, frame order, timestamps, action/state shapes and finiteness
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
    # videos: file exists, per-episode time range matches length, first/last frame decode
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
    try:
        out["split_group"] = split_group(row, cfg.split_by, out["task"])
    except ValueError as e:
        problems.append(str(e))
    out["split"] = (("val" if ep in val_set else "train") if val_set is not None else
                    split_of(cfg.source, ep, cfg.val_fraction, cfg.split_seed, out["split_group"]))
    out["status"] = "failed" if problems else "ok"
    out["reason"] = "; ".join(problems)
    return out


MANIFEST_SCHEMA = pa.schema([
    ("source", pa.string()), ("repo_id", pa.string()), ("root", pa.string()),
    ("episode_index", pa.int64()), ("length", pa.int64()), ("fps", pa.float64()), ("task", pa.string()),
    ("split", pa.string()), ("split_group", pa.string()), ("has_actions", pa.bool_()), ("action_dim", pa.int64()),
    ("state_dim", pa.int64()),
    ("camera_keys", pa.list_(pa.string())), ("video_files", pa.list_(pa.string())),
    ("from_ts", pa.list_(pa.float64())), ("to_ts", pa.list_(pa.float64())), ("data_file", pa.string()),
    ("status", pa.string()), ("reason", pa.string()),
])


def _table(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    if meta is not None:
        table = table.replace_schema_metadata({MANIFEST_META_KEY: json.dumps(meta).encode()})
    return table


def _write_parquet(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def camera_span(root: Path, row: Any, k: int, fps: float) -> VideoSpan:
    """The video span of camera k (index into the row's camera_keys) of one manifest row."""
    return VideoSpan(Path(root) / row["video_files"][k], float(row["from_ts"][k]), int(row["length"]), float(fps))


def read_manifest(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The manifest rows and its metadata (config, dataset info hash, counts, video fingerprints). Every value a
    later stage turns into a path is checked here (`check_manifest_paths`), so a manifest shared or edited by hand
    cannot point a stage outside the store or the dataset root."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; run `wmctl ingest` first")
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(MANIFEST_META_KEY, b"{}"))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable manifest ({e}); re-run `wmctl ingest --force`") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise UserError(f"{path} is not a wmctl manifest (no wmctl metadata); re-run `wmctl ingest`")
    missing = sorted(set(MANIFEST_SCHEMA.names) - set(table.column_names))
    if missing:
        raise UserError(f"{path} is not a wmctl manifest (no column(s) {missing}); re-run `wmctl ingest --force`")
    df = table.to_pandas()
    check_manifest_paths(df, path)
    return df, meta


def _values(column: pd.Series) -> set[Any]:
    """The distinct items of a list column (a missing list counts as empty)."""
    return {v for items in column for v in (items if items is not None else ())}


def check_manifest_paths(df: pd.DataFrame, path: Path) -> None:
    """Refuse (UserError naming the manifest and the value) a source name, repo id or camera key that is not one
    safe name, and a video or data file that is not a relative path staying inside its row's dataset root."""
    fix = f"{path} is damaged or was edited by hand: re-run `wmctl ingest --force`."
    for source in df.source.unique():
        safe_component(source, f"source name in {path}", fix)
    for repo_id in df.repo_id.unique():
        safe_relative(repo_id, f"repo id in {path}", fix, max_parts=2)
    for cam in _values(df.camera_keys):
        safe_component(cam, f"camera key in {path}", fix)
    bad_root = [r for r in df.root.unique() if not isinstance(r, str) or not r]
    if bad_root:
        raise UserError(f"{path}: dataset root {bad_root[0]!r} is not a path. {fix}")
    ok = df.status.to_numpy() == "ok"
    for ep, keys, *lists, data_file in zip(df.episode_index[ok], df.camera_keys[ok], df.video_files[ok],
                                           df.from_ts[ok], df.to_ts[ok], df.data_file[ok]):
        n = len(keys) if keys is not None else 0
        if not n or any(v is None or len(v) != n for v in lists) or not isinstance(data_file, str) or not data_file:
            raise UserError(f"{path}: episode {ep} does not list one video file and time range per camera, or has "
                            f"no data file. {fix}")
    files = {(root, rel) for root, rels in zip(df.root, df.video_files) for rel in (rels if rels is not None else ())}
    files |= {(root, rel) for root, rel in zip(df.root, df.data_file) if rel}
    for _, rel in sorted(files):  # lexically confined: no `..`, not absolute (links inside a dataset are its own)
        safe_relative(rel, f"dataset file in {path}", fix)


FINGERPRINT_BYTES = 1 << 20  # a video's fingerprint hashes its first and last MiB
_WARNED_UNCHECKED: set[str] = set()


def video_fingerprint(path: Path) -> dict[str, Any]:
    """A cheap fingerprint of a video file: its size, mtime_ns and a sha256 of its first and last MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h.update(f.read(FINGERPRINT_BYTES))
        if st.st_size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, st.st_size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def video_changed(path: Path, recorded: dict[str, Any]) -> bool:
    """Whether `path` differs from its recorded fingerprint: gone, another size, or (when its mtime moved) other
    bytes at either end. The same size and mtime_ns is taken as unchanged without reading the file; a file copied
    or touched (a new mtime, the same bytes) is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    if st.st_size != recorded.get("size"):
        return True
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return False
    return video_fingerprint(path)["sha256"] != recorded.get("sha256")


def check_videos(manifest: Path, df: pd.DataFrame, meta: dict[str, Any], cameras: list[int] | None = None) -> None:
    """Refuse (UserError naming the file) a video of the manifest's ok episodes (cameras at positions `cameras`,
    default all) that changed since ingest recorded its fingerprint. A manifest from before fingerprints: one
    warning per process that its videos cannot be checked."""
    recorded = meta.get("video_fingerprints")
    if not isinstance(recorded, dict):
        if str(manifest) not in _WARNED_UNCHECKED:
            _WARNED_UNCHECKED.add(str(manifest))
            log.warning("%s was written before wmctl recorded video fingerprints: a video replaced since cannot be "
                        "detected; re-run `wmctl ingest --force` to record them", manifest)
        return
    ok = df[df.status == "ok"]
    files = {(root, files[k]) for root, files in zip(ok.root, ok.video_files)
             for k in (cameras if cameras is not None else range(len(files)))}
    for root, rel in sorted(files):
        want = recorded.get(rel)
        if not isinstance(want, dict) or video_changed(Path(root) / rel, want):
            raise UserError(f"{Path(root) / rel} changed since {manifest} was written: re-run `wmctl ingest --force`")


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
    _write_parquet(out, table.replace_schema_metadata({MANIFEST_META_KEY: json.dumps(manifest_meta).encode()}))
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

    episodes = meta.episodes
    n_blocks = max(1, -(-len(episodes) // cfg.block_size))
    val_set = exact_val_episodes(cfg.source, [int(e) for e in episodes.episode_index], cfg.val_episodes,
                                 cfg.split_seed) if cfg.val_episodes else None
    parts = _parts_dir(Path(cfg.out))
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
            _write_parquet(block_path, _table(rows))
            done_here += 1
            fault_point("ingest-block")
    finally:
        prober.close()
        if frames is not None:
            frames.close()

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
