"""Actions in their three spaces, converted in one place: dataset ⇄ model ⇄ environment.

- dataset: what the robot recorded per step, `action` [steps, A] next to `observation.state` [steps, S];
- model (raw): the same per step in the model's frame of reference. `absolute`: unchanged; `relative_to_state`:
  the first min(A, S) channels minus the state (e.g. a pusht target minus the agent's position). One model frame
  spans `frameskip` steps: its action is those steps concatenated, `frame_dim = frameskip x A` wide, or, with
  `kinds` (a model trained at a rate in seconds, `train --fps`), the steps added up by each dimension's kind
  (delta summed, absolute the last, velocity the mean): one A-wide action per model frame, what the planner
  searches, executed as `frame_steps` (a delta split evenly over the steps, the others held);
- normalised: each channel as (x - mean) / std with the training actions' statistics (per step when concatenated,
  per model frame when added up: what the network sees);
- environment: a model step turned back into what the robot executes, given the state it is in.

The world model exposes its `ActionSpace` (`LoadedWorldModel.actions`); training, eval and the planners call it,
so no other module branches on the action mode. Legend: T = steps, A = action width, S = state width.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import numpy as np
import torch

from pipeline.rates import aggregate_steps, split_steps

ACTION_MODES = ("absolute", "relative_to_state")

Array = TypeVar("Array", np.ndarray, torch.Tensor)


@dataclasses.dataclass(frozen=True)
class ActionSpace:
    mode: str
    frameskip: int
    mean: np.ndarray  # [A] of the model's raw per-step actions (per model frame with `kinds`)
    std: np.ndarray  # [A]
    kinds: tuple[str, ...] = ()  # per dimension, how a frame's steps add up (empty: concatenated)

    def __post_init__(self) -> None:
        if self.mode not in ACTION_MODES:
            raise ValueError(f"action mode {self.mode!r}: one of {ACTION_MODES}")
        if self.kinds and len(self.kinds) != len(self.mean):
            raise ValueError(f"{len(self.kinds)} action kinds for {len(self.mean)} action dimensions")

    @property
    def _tiles(self) -> int:
        """Copies of the per-step statistics in one frame's action (1 when the steps are added up)."""
        return 1 if self.kinds else self.frameskip

    @property
    def step_dim(self) -> int:
        return len(self.mean)

    @property
    def frame_dim(self) -> int:
        """Width of one model frame's action (0: the model was trained without actions)."""
        return self.step_dim * self._tiles

    # ------------------------------------------------------------------ dataset -> model
    def from_dataset(self, action_TA: Array, state_TS: Array | None) -> Array:
        """Recorded per-step actions [..., T, A] (+ states [..., T, S]) -> model-space per-step actions, same
        type and dtype promotion as the inputs (numpy or torch)."""
        if self.mode == "absolute":
            return action_TA
        if state_TS is None:
            raise ValueError("this model takes actions relative to the state: pass the states too")
        k = min(action_TA.shape[-1], state_TS.shape[-1])
        if isinstance(action_TA, torch.Tensor):
            s = torch.as_tensor(state_TS, dtype=action_TA.dtype, device=action_TA.device)
            return torch.cat([action_TA[..., :k] - s[..., :k], action_TA[..., k:]], dim=-1)
        out = action_TA - np.zeros((), dtype=np.result_type(action_TA, state_TS))  # a copy at the promoted dtype
        out[..., :k] -= state_TS[..., :k]
        return out

    def per_frame(self, steps_TA: Array) -> Array:
        """Per-step model actions [..., frames x frameskip, A] -> per-frame actions [..., frames, frame_dim]
        (concatenated, or added up by kind)."""
        *lead, T, A = steps_TA.shape
        if T % self.frameskip:
            raise ValueError(f"{T} action steps is not a multiple of frameskip {self.frameskip}")
        if self.kinds:
            return aggregate_steps(steps_TA.reshape(*lead, T // self.frameskip, self.frameskip, A), self.kinds)
        return steps_TA.reshape(*lead, T // self.frameskip, self.frameskip * A)

    # ------------------------------------------------------------------ normalisation
    def normalize_frames(self, frames_TF: Array) -> Array:
        """Per-frame model actions [..., frame_dim] -> normalised (each channel with its own statistics)."""
        mean, std = np.tile(self.mean, self._tiles), np.tile(self.std, self._tiles)
        return (frames_TF - self._stat(mean, frames_TF)) / self._stat(std, frames_TF)

    @staticmethod
    def _stat(v: np.ndarray, like: Array) -> Array:
        if isinstance(like, torch.Tensor):
            return torch.from_numpy(np.asarray(v)).to(like)
        return v

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """A box for planning in the per-frame model space: the training actions' mean +- 2.5 std (float64)."""
        m = np.tile(self.mean, self._tiles).astype(np.float64)
        s = np.tile(self.std, self._tiles).astype(np.float64)
        return m - 2.5 * s, m + 2.5 * s

    # ------------------------------------------------------------------ model -> environment
    def frame_steps(self, frame_F: np.ndarray) -> np.ndarray:
        """One frame's model action [frame_dim] -> its per-step model actions [frameskip, A], in order (an added-up
        action split so that it adds back up: `pipeline.rates.split_steps`)."""
        if self.kinds:
            return split_steps(frame_F, self.frameskip, self.kinds)
        return np.asarray(frame_F).reshape(self.frameskip, self.step_dim)

    def to_env(self, step_A: np.ndarray, state_S: np.ndarray) -> np.ndarray:
        """One model-space step [A] -> the action the environment executes in state [S] (the inverse of
        `from_dataset` for that step)."""
        a = np.asarray(step_A, dtype=np.float64)
        if self.mode == "absolute":
            return a
        k = min(len(a), len(state_S))
        return np.concatenate([a[:k] + np.asarray(state_S)[:k], a[k:]])
