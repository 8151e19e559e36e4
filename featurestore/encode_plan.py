"""What `wmctl encode` is asked (`EncodeConfig`), the source it reads (`SourceInfo`), its work units
(`SegmentPlan`, planned by `plan_segments`: a pure function of the manifest and of what the store has committed or
recorded as failed) and what it reports (`EncodeResult`). The stage itself: `featurestore.encode`."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featurestore.encoders import DEFAULT_ENCODER, Preprocess
from featurestore.store import StoreLayout, TokenStore
from pipeline.machine import resolve_device
from pipeline.stage import ShardSpec, UserError

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
