"""The manifest contract: what `wmctl ingest` writes and every later stage reads (`read_manifest`), never the raw
metadata. One Parquet row per episode (`MANIFEST_SCHEMA`: where its frames are, its split, `status` ok/failed with
the reason) and the wmctl metadata under `MANIFEST_META_KEY` (the ingest config, counts, the fingerprints of the
videos, checked by `check_videos` before a stage decodes them). Reading checks every value a stage joins to a path
(`check_manifest_paths`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.frames import VideoSpan
from pipeline.names import safe_component, safe_relative
from pipeline.stage import UserError, atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST_META_KEY = b"wmctl"

MANIFEST_SCHEMA = pa.schema([
    ("source", pa.string()), ("repo_id", pa.string()), ("root", pa.string()),
    ("episode_index", pa.int64()), ("length", pa.int64()), ("fps", pa.float64()), ("task", pa.string()),
    ("split", pa.string()), ("split_group", pa.string()), ("has_actions", pa.bool_()), ("action_dim", pa.int64()),
    ("state_dim", pa.int64()),
    ("camera_keys", pa.list_(pa.string())), ("video_files", pa.list_(pa.string())),
    ("from_ts", pa.list_(pa.float64())), ("to_ts", pa.list_(pa.float64())), ("data_file", pa.string()),
    ("status", pa.string()), ("reason", pa.string()),
])


def manifest_table(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    if meta is not None:
        table = table.replace_schema_metadata({MANIFEST_META_KEY: json.dumps(meta).encode()})
    return table


def write_parquet(path: Path, table: pa.Table) -> None:
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
