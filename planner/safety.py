"""Safety between a planner and a real arm, in one place: every chunk of actions the server sends passes here.

- Action bounds: each action within per-dimension bounds (default: the range of `action` the run's dataset recorded).
- Per-step clamp: the change between consecutive actions at most `max_step_change` per dimension (the first action
  of a chunk against the last one sent).
- Workspace box: the end effector stays in a box (default: the range of `observation.state`'s position dimensions in
  the run's dataset, widened by `workspace_margin`). For `delta` actions (a displacement of the end effector per
  step, `delta_scale` state units per action unit) the positions the chunk would reach from the observed one are
  clipped into the box and the deltas recomputed; for `absolute` actions (position targets) the targets are.
- Per-chunk clamp: the end effector's travel over one chunk at most `max_chunk_travel` from where it was observed.
- Stop: a hold chunk (zero displacement for `delta`, the observed position for `absolute`; other dimensions, e.g.
  the gripper, keep the last value sent) instead of a plan when observations stopped arriving for `obs_timeout_s`,
  when a plan missed its deadline (`deadline_s`) or when planning failed.

Position limits win over smoothness: the box and the travel limit are applied after the per-step clamp, so an arm
driven into a wall stops there. Every clamp and hold is counted in a `SafetyReport` (one count per action changed).
Legend: T = actions in a chunk, A = action width, S = state width.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import UserError

log = logging.getLogger(__name__)

ACTION_KINDS = ("delta", "absolute")
EVENTS = ("clip_action", "clip_step", "clip_workspace", "clip_chunk", "hold_timeout", "hold_deadline", "hold_error")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetyConfig:
    enabled: bool = True
    action_kind: str = "delta"  # delta: the position dims are end-effector displacements; absolute: targets
    position_dims: tuple[int, ...] = (0, 1, 2)  # action dimensions that move the end effector
    state_dims: tuple[int, ...] = (0, 1, 2)  # observation.state dimensions of its position, in the same order
    delta_scale: float = 1.0  # state units per delta action unit (Meta-World at 20 Hz: 0.04 m)
    workspace_low: tuple[float, ...] | None = None  # None: the dataset's observation.state range
    workspace_high: tuple[float, ...] | None = None
    workspace_margin: float = 0.0  # state units added on each side of the dataset's range
    action_low: tuple[float, ...] | None = None  # None: the dataset's action range
    action_high: tuple[float, ...] | None = None
    max_step_change: tuple[float, ...] | None = None  # None: `max_step_fraction` of the action range
    max_step_fraction: float = 0.5
    max_chunk_travel: float | None = None  # state units (Euclidean) one chunk may move the end effector
    obs_timeout_s: float = 1.0
    deadline_s: float | None = None  # a plan slower than this is not executed (None: no deadline)

    def __post_init__(self) -> None:
        if self.action_kind not in ACTION_KINDS:
            raise UserError(f"--action-kind {self.action_kind!r}: choose one of {', '.join(ACTION_KINDS)}")
        if len(self.position_dims) != len(self.state_dims):
            raise UserError(f"--position-dims {self.position_dims} and --state-dims {self.state_dims}: give one "
                            "state dimension per action dimension that moves the end effector")
        if self.delta_scale <= 0 or self.obs_timeout_s <= 0 or self.max_step_fraction <= 0:
            raise UserError("--delta-scale, --obs-timeout and --max-step-fraction must be positive")
        for lo, hi, what in ((self.workspace_low, self.workspace_high, "workspace"),
                             (self.action_low, self.action_high, "action")):
            if (lo is None) != (hi is None) or (lo is not None and (len(lo) != len(hi) or
                                                                     any(a > b for a, b in zip(lo, hi)))):
                raise UserError(f"--{what}-low {lo} / --{what}-high {hi}: give both, of one length, low <= high")


@dataclasses.dataclass
class SafetyReport:
    """What the guard did: chunks and actions seen, and per event the actions changed (holds: actions sent)."""

    chunks: int = 0
    actions: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(EVENTS, 0))

    def as_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "actions": self.actions, **self.counts}

    def summary(self) -> str:
        events = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v) or "no clamps or holds"
        return f"safety: {self.chunks} chunks, {self.actions} actions; {events}"


def dataset_ranges(root: Path, keys: tuple[str, ...] = ("observation.state", "action")
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(min, max) per dimension of each key in a LeRobot dataset: its meta/stats.json, else its data files."""
    root = Path(root)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    stats_file = root / "meta" / "stats.json"
    try:
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    except (OSError, ValueError):
        stats = {}
    for key in keys:
        s = stats.get(key, {})
        if "min" in s and "max" in s:
            out[key] = (np.asarray(s["min"], np.float64).ravel(), np.asarray(s["max"], np.float64).ravel())
    missing = [k for k in keys if k not in out]
    if missing:
        import pandas as pd

        files = sorted(root.glob("data/*/*.parquet"))
        if not files:
            raise UserError(f"{root}: no meta/stats.json range and no data files for {', '.join(missing)}; pass "
                            "the workspace and action bounds explicitly")
        table = pd.concat(pd.read_parquet(f, columns=missing) for f in files)
        for k in missing:
            values = np.stack(table[k].to_numpy()).astype(np.float64)
            out[k] = (values.min(0), values.max(0))
    return out


class SafetyGuard:
    """Clamps chunks and makes hold chunks by `SafetyConfig`; thread-safe; `report` counts what it did."""

    def __init__(self, cfg: SafetyConfig, *, action_bounds: tuple[np.ndarray, np.ndarray] | None = None,
                 workspace: tuple[np.ndarray, np.ndarray] | None = None):
        self.cfg = cfg
        self.report = SafetyReport()
        self.last: dict[str, int] = {}  # the events of the last chunk (clamped or hold)
        self._lock = threading.Lock()
        if cfg.action_low is not None:
            action_bounds = (np.asarray(cfg.action_low, np.float64), np.asarray(cfg.action_high, np.float64))
        if cfg.workspace_low is not None:
            workspace = (np.asarray(cfg.workspace_low, np.float64), np.asarray(cfg.workspace_high, np.float64))
        elif workspace is not None:
            workspace = (workspace[0] - cfg.workspace_margin, workspace[1] + cfg.workspace_margin)
        self.action_bounds, self.workspace = action_bounds, workspace
        if workspace is not None and len(workspace[0]) != len(cfg.position_dims):
            raise UserError(f"workspace box of {len(workspace[0])} dimensions for {len(cfg.position_dims)} position "
                            "dimensions: give --workspace-low/--workspace-high per position dimension")
        self.max_step = np.asarray(cfg.max_step_change, np.float64) if cfg.max_step_change is not None else (
            (action_bounds[1] - action_bounds[0]) * cfg.max_step_fraction if action_bounds is not None else None)

    @classmethod
    def from_dataset(cls, cfg: SafetyConfig, root: Path) -> SafetyGuard:
        """Bounds the config leaves open from the dataset at `root` (its observation.state and action ranges)."""
        ranges = dataset_ranges(root)
        lo, hi = ranges["observation.state"]
        dims = list(cfg.state_dims)
        if max(dims, default=-1) >= len(lo):
            raise UserError(f"--state-dims {cfg.state_dims}: {root} records {len(lo)} observation.state dimensions")
        return cls(cfg, action_bounds=ranges["action"], workspace=(lo[dims], hi[dims]))

    def _count(self, event: str, n: int) -> None:
        if n:
            self.report.counts[event] += int(n)
            self.last[event] = self.last.get(event, 0) + int(n)

    def last_summary(self) -> str:
        """The clamps and holds of the last chunk, as a log line's part."""
        return ", ".join(f"{k} {v}" for k, v in self.last.items()) or "no clamps"

    def filter_chunk(self, actions_TA: np.ndarray, state_S: np.ndarray, previous_A: np.ndarray | None = None
                     ) -> np.ndarray:
        """The chunk as the robot may execute it, from the observed state and the action sent last."""
        a = np.array(actions_TA, dtype=np.float64, copy=True)
        with self._lock:
            self.last = {}
            self.report.chunks += 1
            self.report.actions += len(a)
            if not self.cfg.enabled or len(a) == 0:
                return a
            if self.action_bounds is not None:
                clipped = np.clip(a, *self.action_bounds)
                self._count("clip_action", (np.abs(clipped - a) > 1e-12).any(1).sum())
                a = clipped
            if self.max_step is not None:
                a = self._clamp_steps(a, previous_A)
            a = self._limit_positions(a, np.asarray(state_S, np.float64))
        return a

    def _clamp_steps(self, a_TA: np.ndarray, previous_A: np.ndarray | None) -> np.ndarray:
        prev = np.asarray(previous_A, np.float64) if previous_A is not None else (
            np.zeros(a_TA.shape[1]) if self.cfg.action_kind == "delta" else None)
        changed = 0
        for t in range(len(a_TA)):
            if prev is not None:
                new = np.clip(a_TA[t], prev - self.max_step, prev + self.max_step)
                changed += bool((np.abs(new - a_TA[t]) > 1e-12).any())
                a_TA[t] = new
            prev = a_TA[t]
        self._count("clip_step", changed)
        return a_TA

    def _limit_positions(self, a_TA: np.ndarray, state_S: np.ndarray) -> np.ndarray:
        """The workspace box, then the chunk's travel, on the positions the chunk commands."""
        pd_, sd = list(self.cfg.position_dims), list(self.cfg.state_dims)
        start = state_S[sd]
        if self.cfg.action_kind == "delta":
            pos_TP = start + self.cfg.delta_scale * np.cumsum(a_TA[:, pd_], axis=0)
        else:
            pos_TP = a_TA[:, pd_].copy()
        for event, limit in (("clip_workspace", self._box), ("clip_chunk", self._travel)):
            new = limit(pos_TP, start)
            self._count(event, (np.abs(new - pos_TP) > 1e-12).any(1).sum())
            pos_TP = new
        if self.cfg.action_kind == "delta":
            a_TA[:, pd_] = np.diff(np.concatenate([start[None], pos_TP]), axis=0) / self.cfg.delta_scale
        else:
            a_TA[:, pd_] = pos_TP
        return a_TA

    def _box(self, pos_TP: np.ndarray, start_P: np.ndarray) -> np.ndarray:
        if self.workspace is None:
            return pos_TP
        # an end effector observed outside the box may come back, never go farther out
        lo, hi = np.minimum(self.workspace[0], start_P), np.maximum(self.workspace[1], start_P)
        return np.clip(pos_TP, lo, hi)

    def _travel(self, pos_TP: np.ndarray, start_P: np.ndarray) -> np.ndarray:
        if self.cfg.max_chunk_travel is None:
            return pos_TP
        d_TP = pos_TP - start_P
        norm_T = np.linalg.norm(d_TP, axis=1, keepdims=True)
        scale = np.minimum(1.0, self.cfg.max_chunk_travel / np.maximum(norm_T, 1e-12))
        return start_P + d_TP * scale

    def hold(self, n: int, state_S: np.ndarray | None, previous_A: np.ndarray | None, *, reason: str,
             action_dim: int) -> np.ndarray:
        """`n` hold actions [n, A]: zero displacement (delta) or the observed position (absolute); other dimensions
        keep the last action sent (zeros if none). `reason`: timeout | deadline | error (counted)."""
        a = np.zeros(action_dim) if previous_A is None else np.asarray(previous_A, np.float64).copy()
        pd_ = list(self.cfg.position_dims)
        if self.cfg.action_kind == "delta":
            a[pd_] = 0.0
        elif state_S is not None:
            a[pd_] = np.asarray(state_S, np.float64)[list(self.cfg.state_dims)]
        with self._lock:
            self.last = {}
            self.report.chunks += 1
            self.report.actions += n
            self._count(f"hold_{reason}", n)
        return np.tile(a, (n, 1))

    def missed_deadline(self, latency_s: float) -> bool:
        return self.cfg.enabled and self.cfg.deadline_s is not None and latency_s > self.cfg.deadline_s

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.report.as_dict()
