"""The token store's format (`featurestore.store` has the folder layout): the schema version and attribute keys,
how tokens are laid out and compressed (`StoreLayout`, `_codecs`, int8 quantisation), the size a store will take
(`projected_bytes`, `token_compression`), and the checks of what a committed group's metadata must hold."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.stage import UserError

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
