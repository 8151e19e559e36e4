"""The Zarr v3 token store: schema, segment writer, committed-segment listing.

```
tokens.zarr/                          root group; attrs["wmctl_token_store"]: schema, encoder identity, layout
  sources/<source>/                   attrs["wmctl_source"]: provenance (repo id, root, fps, info.json hash, ...)
    segments/<segment id>/            a COMMITTED group of whole episodes, written by one task
      patch        [F, C, P, D]  float16 (or int8 + patch_scale [F, C, P] float16, per-token absmax / 127)
      cls          [F, C, D]     float16
      action       [F, A]        float32, NaN where there is no action (never zeros that look real)
      action_valid [F]           bool
      state        [F, S]        float32 (NaN when the dataset has no observation.state)
      timestamp    [F]           float64 (seconds within the episode, from the dataset)
      episode_index, frame_index [F]
      attrs["wmctl_segment"]: the episode table (start, length, split, has_actions, task, view, ...)
    staging/<segment id>.<host.pid.tag>/   in progress; readers ignore it; renamed into segments/ to commit
    failed/<e{episode}-v{view}>/      a group whose attrs say why that episode could not be encoded
```

Why segments: a Zarr shard is rewritten whole, so two writers touching one shard lose data without an
error (zarr-python #3682, #3514). A segment is written by exactly one task into a private staging group
and committed with one directory rename; committed segments are never rewritten, and appending episodes
adds segments. Within a segment each array shard (the write unit) is written once, whole.
F = frames, C = cameras, P = patch tokens per camera, D = encoder width, A/S = action/state width.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.stage import ConfigMismatchError, UserError, config_differences, fault_point, is_stale, owner_tag

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STORE_KEY, SOURCE_KEY, SEGMENT_KEY, FAILED_KEY = "wmctl_token_store", "wmctl_source", "wmctl_segment", "wmctl_failed"
DTYPES = ("float16", "int8")

STORE_DESCRIPTION = (
    "Frozen image-encoder tokens of LeRobot camera frames, written by wmctl. Each sources/<name>/segments/<id> "
    "group holds whole episodes, frame-major: patch [frame, camera, token, dim] (float16, or int8 with "
    "patch_scale [frame, camera, token]: value = int8 * scale), cls [frame, camera, dim], action [frame, dim] "
    "(NaN where action_valid is false), state, timestamp, episode_index, frame_index; the episode table is in "
    "the segment's attributes. Only segments/ holds committed data; staging/ is work in progress."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreLayout:
    """How tokens are stored. chunk = the read unit (a few frames, >= ~1 MB for ViT-B); shard = the write unit."""

    dtype: str = "float16"
    chunk_frames: int = 4
    shard_frames: int = 256
    episodes_per_segment: int = 16
    compression_level: int = 3

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose one of {DTYPES}")
        if self.chunk_frames < 1 or self.shard_frames % self.chunk_frames:
            raise UserError(f"shard_frames ({self.shard_frames}) must be a multiple of chunk_frames "
                            f"({self.chunk_frames})")
        if self.episodes_per_segment < 1:
            raise UserError("episodes_per_segment must be >= 1")


def projected_bytes(frames: int, *, cameras: int, tokens: int, dim: int, dtype: str = "float16",
                    action_dim: int = 0, state_dim: int = 0, token_ratio: float = 1.0) -> int:
    """Bytes the store's arrays take for `frames` frames, uncompressed (this schema: patch [F, C, P, D] at
    `dtype` (+ int8's float16 patch_scale [F, C, P]), cls [F, C, D] float16, action/state float32,
    action_valid bool, timestamp float64, episode_index int64, frame_index int32): the capacity to plan for
    when nothing compresses. `token_ratio`: the share of the token arrays (patch, scale, cls) on disk
    (`token_compression` measures it on a sample), for an estimate of the arrays' size on disk (the low-dim
    arrays counted raw; the per-segment metadata, a few KB, not counted: it matters only for toy stores)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: choose one of {DTYPES}")
    patch = cameras * tokens * (dim * (1 if dtype == "int8" else 2) + (2 if dtype == "int8" else 0))
    lowdim = 4 * action_dim + 1 + 4 * state_dim + 8 + 8 + 4
    return int(round(frames * ((patch + cameras * dim * 2) * token_ratio + lowdim)))


def token_compression(patch_FCPD: np.ndarray, cls_FCD: np.ndarray, layout: StoreLayout) -> float:
    """The share of their raw bytes that encoder tokens (patch [F, C, P, D], cls [F, C, D]; float, frame-major as
    stored) take on disk at `layout`: its dtype (int8 with its float16 scale), its codec (blosc zstd with byte
    shuffle) on its chunks (`chunk_frames` frames of patch; cls in one chunk), plus the 4-byte checksum and the
    16-byte shard-index entry of every chunk."""
    from numcodecs import Blosc

    codec = Blosc(cname="zstd", clevel=layout.compression_level, shuffle=Blosc.SHUFFLE)

    def stored(x: np.ndarray, rows: int) -> tuple[int, int]:
        chunks = [np.ascontiguousarray(x[i:i + rows]) for i in range(0, len(x), rows)]
        return sum(len(codec.encode(c)) + 20 for c in chunks), x.nbytes

    if layout.dtype == "int8":
        q, scale = quantize_int8(np.asarray(patch_FCPD, dtype=np.float32))
        parts = [stored(q, layout.chunk_frames), stored(scale, layout.chunk_frames)]
    else:
        parts = [stored(np.asarray(patch_FCPD, dtype=np.float16), layout.chunk_frames)]
    parts.append(stored(np.asarray(cls_FCD, dtype=np.float16), len(cls_FCD)))
    return sum(d for d, _ in parts) / sum(r for _, r in parts)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8: x [..., D] -> (q int8 [..., D], scale float16 [...]) with x ~ q * scale."""
    scale = np.abs(x).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float16)
    q = np.clip(np.rint(x / scale[..., None].astype(np.float32)), -127, 127).astype(np.int8)
    return q, scale


def _codecs(level: int) -> list:
    """Compression, then a CRC32C checksum of every chunk: damage is detected on read, not trained on."""
    return [BloscCodec(cname="zstd", clevel=level, shuffle="shuffle"), Crc32cCodec()]


class DamagedStoreError(UserError):
    """Committed data that cannot be read back as written (a chunk fails its checksum, is truncated or missing; a
    segment's zarr.json is not the JSON it was)."""

    def __init__(self, store: Path, source: str, segment: str, what: str):
        self.source, self.segment = source, segment
        super().__init__(
            f"{store}: segment {source}/{segment} is damaged ({what}). `wmctl status --store {store} --verify` lists "
            f"every damaged segment; `wmctl encode --store {store} --manifest <{source}'s manifest> --repair` "
            "re-encodes them (the rest of the store is kept)")


def read_node_meta(file: Path, key: str, *, required: bool = True) -> dict[str, Any]:
    """The `key` attributes of a group's zarr.json, checked: a ValueError saying what is wrong with the file when
    it is not JSON (truncated, overwritten), not a group's metadata, or lacks the attributes (unless not
    `required`: then {})."""
    try:
        meta = json.loads(Path(file).read_bytes())
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated?)") from None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
        raise ValueError("not the metadata of a Zarr v3 group (node_type/zarr_format)")
    attrs = meta.get("attributes", {})
    if isinstance(attrs, dict) and key not in attrs and not required:
        return {}
    if not isinstance(attrs, dict) or not isinstance(attrs.get(key), dict):
        raise ValueError(f"its attributes hold no {key} table")
    return attrs[key]


_EPISODE_FIELDS = {"episode_index": int, "view": int, "start": int, "length": int, "split": str}


def check_segment_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """A segment's episode table as readers use it (frames, view, episodes with their index, view, start, length and
    split), or a ValueError naming the first field that is missing or of the wrong type."""
    for k in ("frames", "view"):
        if not _is_int(attrs.get(k)):
            raise ValueError(f"{SEGMENT_KEY}.{k} is {attrs.get(k)!r}, not an integer")
    episodes = attrs.get("episodes")
    if not isinstance(episodes, list) or not all(isinstance(e, dict) for e in episodes):
        raise ValueError(f"{SEGMENT_KEY}.episodes is not a list of episode tables")
    for i, e in enumerate(episodes):
        for k, t in _EPISODE_FIELDS.items():
            if not (_is_int(e.get(k)) if t is int else isinstance(e.get(k), t)):
                raise ValueError(f"{SEGMENT_KEY}.episodes[{i}].{k} is {e.get(k)!r}, not {t.__name__}")
    return attrs


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class TokenStore:
    """A token store directory. Open with `create_or_open` (writers) or `open_existing` (readers)."""

    def __init__(self, path: Path, attrs: dict[str, Any]):
        self.path = Path(path)
        self.attrs = attrs

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_existing(cls, path: Path) -> TokenStore:
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise UserError(f"{path} is not a token store (no zarr.json); create it with `wmctl encode`")
        try:
            raw = json.loads((path / "zarr.json").read_bytes())
            is_group = isinstance(raw, dict) and raw.get("node_type") == "group"
        except ValueError:  # not JSON, not UTF-8
            is_group = False
        if is_group and isinstance(raw.get("attributes", {}), dict) and STORE_KEY not in raw.get("attributes", {}):
            raise UserError(f"{path} is a Zarr group but not a wmctl token store (no {STORE_KEY} attribute)")
        try:
            attrs = read_node_meta(path / "zarr.json", STORE_KEY)
            for k, t in (("encoder", dict), ("layout", dict)):
                if not isinstance(attrs.get(k), t):
                    raise ValueError(f"{STORE_KEY}.{k} is {type(attrs.get(k)).__name__}, not a table")
            StoreLayout(**attrs["layout"])
        except (ValueError, TypeError, UserError) as e:
            raise UserError(f"{path / 'zarr.json'} is damaged ({e}): the token store's root metadata (encoder, "
                            "layout) cannot be read. Restore that file from a copy of the store (another shard's "
                            "node, a backup), or re-encode into a new --store") from None
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: store schema {attrs.get('schema_version')} is not {SCHEMA_VERSION}; "
                            "re-encode into a new store")
        return cls(path, attrs)

    @classmethod
    def recorded_encoder(cls, path: Path) -> dict[str, Any] | None:
        """The encoder identity a store at `path` was made with; None where there is no readable store yet."""
        try:
            return cls.open_existing(path).attrs["encoder"] if (Path(path) / "zarr.json").is_file() else None
        except UserError:
            return None  # create_or_open says what is wrong with it

    @classmethod
    def create_or_open(cls, path: Path, encoder: dict[str, Any], layout: StoreLayout,
                       encoder_location: str | None = None) -> TokenStore:
        """Open a store made with the same encoder (`identity_key`: the weights, not their name or folder) and
        layout, or create it. Refuses others. `encoder_location`: where the encoder was loaded from, recorded at
        creation as a hint for later stages that need the encoder again (never compared)."""
        from featurestore.encoders import identity_key

        path = Path(path)
        wanted = {"encoder": encoder, "layout": dataclasses.asdict(layout)}
        check_store_path(path)
        if (path / "zarr.json").is_file():
            store = cls.open_existing(path)
            have = {"encoder": identity_key(store.attrs["encoder"]), "layout": store.attrs["layout"]}
            want = json.loads(json.dumps({**wanted, "encoder": identity_key(encoder)}))
            if have != want:
                raise ConfigMismatchError(f"token store {path}", config_differences(have, want),
                                          "Encode into another --store, or pass --force to delete and rebuild it.")
            if not (path / "sources" / "zarr.json").is_file():  # a creator killed between the two writes
                _make_group(path / "sources")
            return store
        attrs = {"schema_version": SCHEMA_VERSION, "description": STORE_DESCRIPTION, **wanted,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 **({"encoder_location": encoder_location} if encoder_location else {})}
        # several shards may create the store at once: identical content, atomic per-key writes
        if not _make_group(path, {STORE_KEY: attrs}):  # another writer created it first: theirs must match
            for _ in range(100):  # its zarr.json is being written
                if (path / "zarr.json").is_file():
                    return cls.create_or_open(path, encoder, layout, encoder_location)
                time.sleep(0.05)
            raise UserError(f"{path}: another process is creating this store and has not finished; try again")
        fault_point("store-root")
        _make_group(path / "sources")
        return cls.open_existing(path)

    @property
    def encoder(self) -> dict[str, Any]:
        return self.attrs["encoder"]

    @property
    def encoder_location(self) -> str | None:
        """Where the encoder was loaded from when the store was made (a hint; older stores recorded it as the
        identity's model_id)."""
        old = str(self.encoder.get("model_id", ""))
        return self.attrs.get("encoder_location") or (old if old.startswith("/") else None)

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(**self.attrs["layout"])

    # ------------------------------------------------------------------ sources
    def source_dir(self, source: str) -> Path:
        return self.path / "sources" / source

    def sources(self) -> list[str]:
        d = self.path / "sources"
        return sorted(p.name for p in d.iterdir() if (p / "zarr.json").is_file()) if d.is_dir() else []

    def source_attrs(self, source: str) -> dict[str, Any]:
        file = self.source_dir(source) / "zarr.json"
        try:
            return read_node_meta(file, SOURCE_KEY, required=False)
        except ValueError as e:
            raise UserError(f"{file} is damaged ({e}): source {source}'s provenance cannot be read. Re-encode the "
                            f"source with `wmctl encode --store {self.path} --manifest <its manifest> --force`, or "
                            "restore that file from a copy of the store") from None
        except FileNotFoundError:
            raise UserError(f"{self.path}: no source {source!r} (it has {self.sources()})") from None

    def ensure_source(self, source: str, provenance: dict[str, Any], *, fixed_keys: tuple[str, ...]) -> None:
        """Create the source group, or check that `fixed_keys` of its provenance did not change (and record the
        rest, e.g. a newer manifest). Safe against another writer creating the same source at the same time."""
        d = self.source_dir(source)
        if not (d / "zarr.json").is_file() and _make_group(d, {SOURCE_KEY: provenance}):
            fault_point("source-group")
            self._ensure_subgroups(d)
            return
        have = self.source_attrs(source)  # made earlier, or by another writer just now
        old = {k: have.get(k) for k in fixed_keys}
        new = json.loads(json.dumps({k: provenance.get(k) for k in fixed_keys}))
        if old != new:
            raise ConfigMismatchError(f"source {source!r} in {self.path}", config_differences(old, new),
                                      "Encode it under another source name or --store, or --force.")
        if have != json.loads(json.dumps(provenance)):
            zarr.open_group(d, mode="r+").attrs[SOURCE_KEY] = provenance
        self._ensure_subgroups(d)  # a creator killed after the source's zarr.json left them missing

    @staticmethod
    def _ensure_subgroups(d: Path) -> None:
        for sub in ("segments", "staging", "failed"):
            if not (d / sub / "zarr.json").is_file():
                _make_group(d / sub)

    # ------------------------------------------------------------------ segments
    def committed_segments(self, source: str, damaged: list[dict[str, Any]] | None = None
                           ) -> dict[str, dict[str, Any]]:
        """segment id -> its `wmctl_segment` attributes, for committed segments only. A segment whose zarr.json
        cannot be read raises DamagedStoreError naming the file, or, given a `damaged` list, is appended there
        ({"segment", "file", "problem"}) and left out."""
        d = self.source_dir(source) / "segments"
        out = {}
        if d.is_dir():
            for p in sorted(d.iterdir()):
                meta = p / "zarr.json"
                if not meta.is_file():
                    continue
                try:
                    out[p.name] = check_segment_attrs(read_node_meta(meta, SEGMENT_KEY))
                except ValueError as e:
                    if damaged is None:
                        raise DamagedStoreError(self.path, source, p.name, f"{meta}: {e}") from None
                    damaged.append({"segment": p.name, "file": str(meta), "problem": f"{meta}: {e}"})
        return out

    def failed(self, source: str) -> dict[str, dict[str, Any]]:
        d = self.source_dir(source) / "failed"
        out = {}
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if (p / "zarr.json").is_file():
                    try:
                        out[p.name] = read_node_meta(p / "zarr.json", FAILED_KEY)
                    except ValueError as e:  # a record of a failure only: the episode is tried again
                        log.warning("%s is damaged (%s): ignoring that failure record", p / "zarr.json", e)
        return out

    def record_failure(self, source: str, episode: int, view: int, reason: str) -> None:
        zarr.open_group(self.source_dir(source) / "failed" / f"e{episode:07d}-v{view}", mode="w",
                        attributes={FAILED_KEY: {"episode_index": episode, "view": view, "reason": reason,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})

    def clear_failures(self, source: str) -> None:
        shutil.rmtree(self.source_dir(source) / "failed", ignore_errors=True)
        _make_group(self.source_dir(source) / "failed")

    def staging_entries(self, source: str) -> list[tuple[Path, bool]]:
        """(staging group, stale) for each staging group of `source`: stale when its segment is committed or when
        `is_stale` says its writer is gone (a dead local process, or another host's untouched for hours)."""
        d = self.source_dir(source) / "staging"
        if not d.is_dir():
            return []
        segs = self.source_dir(source) / "segments"  # damaged or not, a committed segment's staging is debris
        committed = {p.name for p in segs.iterdir() if (p / "zarr.json").is_file()} if segs.is_dir() else set()
        out = []
        for p in sorted(d.iterdir()):
            if p.is_dir():
                seg_id, _, tag = p.name.partition(".")
                out.append((p, seg_id in committed or is_stale(tag, p)))
        return out

    def clean_stale_staging(self, source: str) -> int:
        """Remove the stale staging groups (`staging_entries`); live writers' groups stay."""
        n = 0
        for p, stale in self.staging_entries(source):
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    def begin_segment(self, source: str, seg_id: str, *, frames: int, cameras: int, tokens: int, dim: int,
                      action_dim: int, state_dim: int) -> SegmentWriter:
        return SegmentWriter(self, source, seg_id, frames=frames, cameras=cameras, tokens=tokens, dim=dim,
                             action_dim=action_dim, state_dim=state_dim)

    def disk_bytes(self, source: str | None = None, segment: str | None = None) -> int:
        """Bytes on disk of the store, one source, or one committed segment of it."""
        base = self.source_dir(source) if source else self.path
        if segment is not None:
            base = base / "segments" / segment
        return sum(f.stat().st_size for f in base.rglob("*") if f.is_file())


class SegmentWriter:
    """Writes one segment into a private staging group, one whole shard at a time, then commits it."""

    def __init__(self, store: TokenStore, source: str, seg_id: str, *, frames: int, cameras: int, tokens: int,
                 dim: int, action_dim: int, state_dim: int):
        self.store, self.source, self.seg_id, self.frames = store, source, seg_id, frames
        self.layout = store.layout
        self.staging = store.source_dir(source) / "staging" / f"{seg_id}.{owner_tag()}"
        self.final = store.source_dir(source) / "segments" / seg_id
        try:
            self._create_arrays(frames, cameras, tokens, dim)
        except BaseException:  # a full disk while creating the arrays: leave no staging group behind
            self.abort()
            raise
        self.lowdim = {"action_dim": action_dim, "state_dim": state_dim}

    def _create_arrays(self, frames: int, cameras: int, tokens: int, dim: int) -> None:
        layout = self.layout
        g = zarr.open_group(self.staging, mode="w")
        self.group = g
        sf, cf = min(layout.shard_frames, _round_up(frames, layout.chunk_frames)), layout.chunk_frames
        comp = _codecs(layout.compression_level)
        tok_dtype = "int8" if layout.dtype == "int8" else "float16"
        self.patch = g.create_array("patch", shape=(frames, cameras, tokens, dim), dtype=tok_dtype,
                                    chunks=(cf, cameras, tokens, dim), shards=(sf, cameras, tokens, dim),
                                    compressors=comp, fill_value=0 if tok_dtype == "int8" else np.nan,
                                    dimension_names=("frame", "camera", "token", "dim"))
        self.scale = None
        if layout.dtype == "int8":
            self.scale = g.create_array("patch_scale", shape=(frames, cameras, tokens), dtype="float16",
                                        chunks=(cf, cameras, tokens), shards=(sf, cameras, tokens),
                                        compressors=comp, fill_value=np.nan,
                                        dimension_names=("frame", "camera", "token"))
        self.cls = g.create_array("cls", shape=(frames, cameras, dim), dtype="float16",
                                  chunks=(max(1, min(frames, 1024)), cameras, dim), compressors=comp,
                                  fill_value=np.nan, dimension_names=("frame", "camera", "dim"))
        self.shard_frames = sf
        self._buf = np.empty((sf, cameras, tokens, dim), dtype=np.float16)
        self._cls = np.full((frames, cameras, dim), np.nan, dtype=np.float16)
        self._buf_start = 0
        self._filled = 0

    def add(self, start: int, patch_BCPD: np.ndarray, cls_BCD: np.ndarray) -> None:
        """Frames [start, start + B) of the segment, in order. Full shards are written as they complete."""
        if start != self._buf_start + self._filled:
            raise AssertionError(f"frames must arrive in order: got {start}, expected {self._buf_start + self._filled}")
        self._cls[start:start + len(cls_BCD)] = cls_BCD
        i = 0
        while i < len(patch_BCPD):
            n = min(len(patch_BCPD) - i, self.shard_frames - self._filled)
            self._buf[self._filled:self._filled + n] = patch_BCPD[i:i + n]
            self._filled += n
            i += n
            if self._filled == self.shard_frames or self._buf_start + self._filled == self.frames:
                self._flush()

    def _flush(self) -> None:
        s0, n = self._buf_start, self._filled
        block = self._buf[:n]
        if self.scale is not None:
            q, scale = quantize_int8(block.astype(np.float32))
            self.patch[s0:s0 + n] = q
            self.scale[s0:s0 + n] = scale
        else:
            self.patch[s0:s0 + n] = block
        self._buf_start += n
        self._filled = 0
        fault_point("shard-written")

    def commit(self, *, action: np.ndarray, action_valid: np.ndarray, state: np.ndarray, timestamp: np.ndarray,
               episode_index: np.ndarray, frame_index: np.ndarray, attrs: dict[str, Any]) -> bool:
        """Write the low-dim arrays and the episode table, then rename into segments/. False if already there."""
        if self._buf_start != self.frames:
            raise AssertionError(f"segment {self.seg_id}: {self._buf_start}/{self.frames} frames written")
        g, f = self.group, self.frames
        self.cls[:] = self._cls
        lowdim = {
            "action": (action.astype(np.float32), np.nan, ("frame", "action_dim")),
            "action_valid": (action_valid.astype(bool), False, ("frame",)),
            "state": (state.astype(np.float32), np.nan, ("frame", "state_dim")),
            "timestamp": (timestamp.astype(np.float64), np.nan, ("frame",)),
            "episode_index": (episode_index.astype(np.int64), -1, ("frame",)),
            "frame_index": (frame_index.astype(np.int32), -1, ("frame",)),
        }
        for name, (values, fill, dims) in lowdim.items():
            assert len(values) == f, (name, values.shape, f)
            arr = g.create_array(name, shape=values.shape, dtype=values.dtype,
                                 compressors=_codecs(self.layout.compression_level),
                                 chunks=tuple(max(1, s) for s in values.shape), fill_value=fill,
                                 dimension_names=dims)
            if values.size:
                arr[...] = values
        g.attrs[SEGMENT_KEY] = attrs
        fault_point("segment-commit")
        try:
            os.rename(self.staging, self.final)
        except OSError:
            if self.final.exists():  # someone else committed the same segment first
                self.abort()
                return False
            raise
        return True

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def check_store_path(path: Path) -> None:
    """A UserError saying what `path` is when it cannot be a store folder: a file, a symlink loop, a link to nothing,
    or a path through a file; nothing when it is a folder or does not exist yet."""
    path = Path(path)
    fix = "choose another --store path (a folder, or a name that does not exist yet)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(f"--store {path} is a symbolic link to {os.readlink(path)}, which does not exist: create "
                            f"that folder, remove the link, or {fix}") from None
        return
    except NotADirectoryError:
        raise UserError(f"--store {path}: a part of this path is a file where a folder is expected: {fix}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"--store {path} leads through a symbolic link loop (a link that leads back to itself): "
                            f"remove or fix the link, or {fix}") from None
        raise
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"--store {path} is a file ({st.st_size} bytes), not a token store folder: {fix}")


def _make_group(path: Path, attributes: dict[str, Any] | None = None) -> bool:
    """Create a group (with `attributes`), or find it created: False when another process made it first (two
    shards or a duplicated Dask task creating the same store or source at once), True when this call wrote it
    or it already existed without attributes to set."""
    if (Path(path) / "zarr.json").is_file():
        return attributes is None
    try:
        zarr.open_group(path, mode="a", attributes=attributes)
        return True
    except (zarr.errors.ContainsGroupError, FileExistsError):
        return False


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)
