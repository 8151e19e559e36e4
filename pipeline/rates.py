"""Time in seconds: the frame stride that takes a source from its recording rate to a lower rate, and how the
actions of the skipped frames add up into one action per kept frame (by their kind, from the registry).

LeRobot's action at frame i is the command taken at frame i (it leads to frame i + 1), so the kept frame
j * stride carries the actions of frames j * stride .. j * stride + stride - 1: the step to the next kept frame.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.stage import UserError

ACTION_KINDS = ("delta", "absolute", "velocity")


def stride_for(source_fps: float, fps: float | None, source: str, *, what: str = "--fps") -> int:
    """The integral stride from `source_fps` down to `fps` (None: 1), or a UserError naming the source and the
    nearest rates it can serve."""
    if fps is None:
        return 1
    if fps <= 0:
        raise UserError(f"{what} {fps:g}: must be > 0")
    ratio = source_fps / fps
    k = round(ratio)
    if k >= 1 and math.isclose(ratio, k, rel_tol=1e-6):
        return k
    lower = source_fps / math.ceil(ratio) if ratio > 1 else None
    higher = source_fps / math.floor(ratio) if ratio >= 1 else source_fps
    nearest = " or ".join(f"{r:g}" for r in (lower, higher) if r is not None)
    raise UserError(f"{what} {fps:g}: source {source} is at {source_fps:g} fps, and a rate must divide it "
                    f"(every k-th frame); the nearest it can serve: {nearest} fps")


def action_kinds(kind: str | tuple[str, ...] | list[str], dim: int, source: str) -> tuple[str, ...]:
    """One kind per action dimension (a single kind applies to all); refuses a missing or malformed one."""
    if not kind:
        raise UserError(f"source {source} has actions but no `action_kind`: to store or train it at a lower rate, "
                        f"say how its actions add up over skipped frames in its registry entry (action_kind = "
                        f"\"delta\" | \"absolute\" | \"velocity\", or one per dimension, e.g. [\"delta\", \"delta\", "
                        f"\"delta\", \"absolute\"]) or with --action-kind")
    kinds = (kind,) * dim if isinstance(kind, str) else tuple(kind)
    if len(kinds) != dim or any(k not in ACTION_KINDS for k in kinds):
        raise UserError(f"source {source}: action_kind {list(kinds)} must be one of {list(ACTION_KINDS)}, once or "
                        f"once per action dimension ({dim})")
    return kinds


def aggregate_steps(steps_KA, kinds: tuple[str, ...]):
    """The actions of consecutive steps [..., K, A] (numpy or torch) -> one action [..., A] by each dimension's
    kind: delta summed, absolute the last, velocity the mean (the command held over the steps)."""
    summed, last, mean = steps_KA.sum(-2), steps_KA[..., -1, :], steps_KA.mean(-2)
    pick = {"delta": summed, "absolute": last, "velocity": mean}
    if len(set(kinds)) == 1:
        return pick[kinds[0]]
    cols = [pick[k][..., d] for d, k in enumerate(kinds)]
    if isinstance(steps_KA, np.ndarray):
        return np.stack(cols, -1)
    import torch

    return torch.stack(cols, -1)


def split_steps(action_A: np.ndarray, steps: int, kinds: tuple[str, ...]) -> np.ndarray:
    """One action over `steps` steps [A] -> the steps' actions [steps, A] that add back up to it by kind:
    delta split evenly, absolute and velocity held (the inverse of `aggregate_steps` for a plan's execution)."""
    a = np.asarray(action_A, dtype=np.float64)
    per = np.where(np.array([k == "delta" for k in kinds]), a / steps, a)
    return np.repeat(per[None], steps, axis=0)


def aggregate_actions(actions_TA: np.ndarray, stride: int, kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame actions [T, A] -> one action per kept frame [ceil(T / stride), A] and whether it is complete:
    over frames j*stride .. j*stride+stride-1, delta dimensions summed, absolute ones the last, velocity ones
    the mean. A kept frame without `stride` frames of actions after it (the episode's end) gets NaN, invalid."""
    T, A = actions_TA.shape
    n = -(-T // stride)
    out = np.full((n, A), np.nan, dtype=np.float64)
    full = T // stride  # kept frames whose whole step is inside the episode
    if full:
        out[:full] = aggregate_steps(actions_TA[: full * stride].astype(np.float64).reshape(full, stride, A), kinds)
    valid = np.zeros(n, dtype=bool)
    valid[:full] = True
    return out, valid
