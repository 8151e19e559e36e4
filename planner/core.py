"""Goal-conditioned planning in latent space: the protocol, action constraints and costs.

The planners (`planner.cem`, `planner.gd`) are pure, batched functions of a rollout function and a cost:
no logging, no environment, no world-model internals. Legend: S = candidate action sequences,
H = planning horizon (frames), A = action width per frame, N = tokens per frame, Z = token width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch


class ActionSpace(Protocol):
    """The world model's action conversions (`trainer.actions.ActionSpace` implements it): recorded dataset
    actions -> the model's per-frame actions (`frameskip` steps concatenated, `frame_dim` wide), and a model
    step back to what the environment executes. The planner searches in the per-frame model space."""

    frameskip: int

    @property
    def frame_dim(self) -> int: ...

    def bounds(self) -> tuple: ...  # (low, high) per frame dimension

    def from_dataset(self, action_TA, state_TS): ...  # recorded [T, A] (+ states) -> model steps [T, A]

    def per_frame(self, steps_TA): ...  # [frames x frameskip, A] -> [frames, frame_dim]

    def frame_steps(self, frame_F) -> np.ndarray: ...  # [frame_dim] -> [frameskip, A]

    def to_env(self, step_A, state_S) -> np.ndarray: ...  # a model step -> the environment's action


@runtime_checkable
class WorldModel(Protocol):
    """What planning needs from a trained world model (trainer.api.LoadedWorldModel implements it).

    Actions are per frame, in the model's raw action space (`actions`: e.g. pusht target minus agent position
    for a model trained with relative actions), `actions.frame_dim` wide (the env steps of one frame concatenated).
    """

    encoder: dict
    window: int  # frames the model attends to
    dtype: torch.dtype  # what its rollouts run in (reported with planning results)

    @property
    def actions(self) -> ActionSpace: ...

    @property
    def state_dim(self) -> int: ...  # > 0: the last latent token carries the state (proprioception)

    def normalize(self, tokens, state=None) -> torch.Tensor: ...

    def for_source(self, reader, source: str) -> WorldModel: ...  # the model on one store source's cameras

    def planning_rollout(self, context_TNZ: torch.Tensor, *, context_actions_TA: torch.Tensor | None = None,
                         k: int = 4, seed: int = 0) -> Callable[..., torch.Tensor]: ...
        # -> rollout(actions [S, H, A], grad=False) -> latents [S, H, N, Z]; the context is committed once


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32": a dtype as planning results report it."""
    return str(dtype).removeprefix("torch.")


RolloutFn = Callable[[torch.Tensor], torch.Tensor]  # actions [S, H, A] -> predicted latents [S, H, N, Z]
CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents [S, H, N, Z], actions [S, H, A]) -> [S]


@dataclasses.dataclass(frozen=True)
class ActionSpec:
    """Box bounds per action dimension and the largest change between consecutive actions (the safety guard:
    a plan never asks the robot for a jump larger than `max_delta`). `previous` is the action executed last
    (the first planned action is clamped against it)."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    max_delta: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high) or any(lo > hi for lo, hi in zip(self.low, self.high)):
            raise ValueError(f"bad action bounds {self.low} .. {self.high}")
        if self.max_delta is not None and (len(self.max_delta) != len(self.low) or min(self.max_delta) <= 0):
            raise ValueError(f"max_delta {self.max_delta} must be positive, one per action dimension")

    @property
    def dim(self) -> int:
        return len(self.low)

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lo = torch.tensor(self.low, dtype=torch.float32, device=device)
        hi = torch.tensor(self.high, dtype=torch.float32, device=device)
        md = torch.tensor(self.max_delta, dtype=torch.float32, device=device) if self.max_delta else None
        return lo, hi, md


def project(actions_SHA: torch.Tensor, spec: ActionSpec, previous_A: torch.Tensor | None = None) -> torch.Tensor:
    """Clamp to the bounds, then clamp each step's change from the one before (the first against `previous`).
    Sequential in H (each clamp uses the clamped predecessor), vectorised over S. Differentiable a.e."""
    lo, hi, md = spec.tensors(actions_SHA.device)
    a = torch.maximum(torch.minimum(actions_SHA, hi), lo)
    if md is None:
        return a
    steps = []
    prev = previous_A.expand(a.shape[0], -1) if previous_A is not None else None
    for h in range(a.shape[1]):
        cur = a[:, h]
        if prev is not None:
            cur = torch.maximum(torch.minimum(cur, prev + md), prev - md)
            cur = torch.maximum(torch.minimum(cur, hi), lo)
        steps.append(cur)
        prev = cur
    return torch.stack(steps, dim=1)


def latent_cost(goal_NZ: torch.Tensor, *, metric: str = "mse", frame_weights: torch.Tensor | None = None,
                smoothness: float = 0.0, state_dim: int = 0, state_weight: float = 1.0) -> CostFn:
    """Distance of predicted latents to the goal: the last frame (or `frame_weights` [H] over frames), MSE or
    L1 over tokens, plus `smoothness` x mean squared change between consecutive actions. With `state_dim`
    (proprioception: the last token's first `state_dim` channels are the state), the distance is the patches'
    mean plus `state_weight` x the state's mean (DINO-WM's visual + alpha x proprio objective)."""
    if metric not in ("mse", "l1"):
        raise ValueError(f"metric {metric!r}: mse or l1")

    def dist(d: torch.Tensor) -> torch.Tensor:
        return d.pow(2) if metric == "mse" else d.abs()

    def cost(latents_SHNZ: torch.Tensor, actions_SHA: torch.Tensor) -> torch.Tensor:
        diff = latents_SHNZ - goal_NZ
        if state_dim:
            per_frame_SH = dist(diff[:, :, :-1]).mean(dim=(2, 3)) + \
                state_weight * dist(diff[:, :, -1, :state_dim]).mean(-1)
        else:
            per_frame_SH = dist(diff).mean(dim=(2, 3))
        if frame_weights is None:
            c = per_frame_SH[:, -1]
        else:
            w = frame_weights.to(per_frame_SH)
            c = (per_frame_SH * w).sum(1) / w.sum()
        if smoothness and actions_SHA.shape[1] > 1:
            c = c + smoothness * (actions_SHA[:, 1:] - actions_SHA[:, :-1]).pow(2).mean(dim=(1, 2))
        return c

    return cost


@dataclasses.dataclass
class PlanResult:
    actions: torch.Tensor  # [H, A] the best plan found
    cost: float
    costs_per_iteration: list[float]  # best cost after each iteration (for convergence plots/tests)
    model_evaluations: int  # candidate sequences rolled out
    mean: torch.Tensor  # [H, A] final distribution mean (the warm start of the next MPC step)
