"""Writing one segment of the token store: a private staging group, each array shard written once, whole, then one
directory rename into segments/ (`SegmentWriter`; the store hands one out with `TokenStore.begin_segment`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr

from featurestore.store_format import SEGMENT_KEY, StoreLayout, _codecs, quantize_int8
from pipeline.stage import fault_point, owner_tag


class SegmentStore(Protocol):
    """What a segment's writer takes of its store: a `featurestore.store.TokenStore` (named here by what it does:
    the store imports this module)."""

    @property
    def layout(self) -> StoreLayout: ...

    def source_dir(self, source: str) -> Path: ...


class SegmentWriter:
    """Writes one segment into a private staging group, one whole shard at a time, then commits it."""

    def __init__(self, store: SegmentStore, source: str, seg_id: str, *, frames: int, cameras: int, tokens: int,
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


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)
