"""Reading the token store for training and eval: random windows from committed segments only.

`TokenReader` holds only the store path and a small episode table; Zarr arrays are opened lazily in the
process that reads (and reopened after a fork/spawn), so it is safe to hand to DataLoader workers with the
spawn or forkserver start method. Missing data is loud: a window that reads NaN tokens (a chunk that was
never written reads as the NaN fill value) raises instead of returning silent zeros.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from featurestore.store import DamagedStoreError, TokenStore
from pipeline.stage import UserError

WINDOW_FIELDS = ("patch", "cls", "action", "action_valid", "state", "timestamp", "frame_index")


class MissingTokensError(DamagedStoreError):
    """The store returned fill values where committed data should be."""


@dataclasses.dataclass(frozen=True)
class Window:
    """A window of one episode: `length` frames from `start`, every `stride`-th frame."""

    episode: int  # row in TokenReader.episodes
    start: int
    length: int
    stride: int = 1


class TokenReader:
    def __init__(self, path: Path, *, sources: list[str] | None = None):
        self.path = Path(path)
        self.store = TokenStore.open_existing(self.path)
        self.sources = sources or self.store.sources()
        rows = []
        for source in self.sources:
            if source not in self.store.sources():
                raise UserError(f"{self.path}: no source {source!r} (it has {self.store.sources()})")
            for seg_id, seg in self.store.committed_segments(source).items():
                for e in seg["episodes"]:
                    rows.append({"source": source, "segment": seg_id, **{k: v for k, v in e.items() if k != "augment"},
                                 "augmented": e.get("augment") is not None})
        cols = ["source", "segment", "episode_index", "view", "start", "length", "split", "has_actions", "task",
                "augmented"]
        self.episodes = pd.DataFrame(rows, columns=cols).sort_values(["source", "view", "episode_index"],
                                                                      ignore_index=True)
        self._arrays: dict[tuple[str, str, str], zarr.Array] = {}
        self._pid = os.getpid()

    # pickling for DataLoader workers: send the table, not open arrays
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = -1

    @property
    def encoder(self) -> dict[str, Any]:
        return self.store.encoder

    def source_attrs(self, source: str) -> dict[str, Any]:
        return self.store.source_attrs(source)

    def _array(self, source: str, segment: str, name: str) -> zarr.Array:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        key = (source, segment, name)
        if key not in self._arrays:
            self._arrays[key] = zarr.open_array(self.store.source_dir(source) / "segments" / segment / name, mode="r")
        return self._arrays[key]

    def read(self, w: Window, fields: tuple[str, ...] = WINDOW_FIELDS) -> dict[str, np.ndarray]:
        """The window's arrays. patch [T, C, P, D] and cls [T, C, D] as float32 (int8 dequantised)."""
        ep = self.episodes.iloc[w.episode]
        last = w.start + (w.length - 1) * w.stride
        if w.start < 0 or w.length < 1 or last >= ep.length:
            raise IndexError(f"window {w} is outside episode {ep.episode_index} ({ep.length} frames)")
        g0, g1 = int(ep.start) + w.start, int(ep.start) + last + 1
        out = {}
        for name in fields:
            if name == "patch" and self.store.layout.dtype == "int8":
                q = self._read(ep, "patch", slice(g0, g1, w.stride))
                scale = self._read(ep, "patch_scale", slice(g0, g1, w.stride))
                if np.isnan(scale).any():
                    raise MissingTokensError(self.path, ep.source, ep.segment, "patch_scale has missing chunks")
                out[name] = q.astype(np.float32) * scale[..., None].astype(np.float32)
                continue
            values = self._read(ep, name, slice(g0, g1, w.stride))
            if name in ("patch", "cls"):
                values = values.astype(np.float32)
                if np.isnan(values).any():
                    raise MissingTokensError(self.path, ep.source, ep.segment,
                                             f"{name} has missing chunks at frames {g0}-{g1}")
            out[name] = values
        return out

    def _read(self, ep, name: str, rows: slice) -> np.ndarray:
        try:
            return self._array(ep.source, ep.segment, name)[rows]
        except (OSError, ValueError, RuntimeError, KeyError) as e:  # checksum mismatch, truncated shard, lost file
            raise DamagedStoreError(self.path, ep.source, ep.segment, f"{name}: {type(e).__name__}: {e}") from None

    def episode(self, row: int, fields: tuple[str, ...] = WINDOW_FIELDS) -> dict[str, np.ndarray]:
        return self.read(Window(row, 0, int(self.episodes.iloc[row].length)), fields)
