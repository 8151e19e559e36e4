"""Planning with the amortized proposal: a goal-conditioned policy head trained on the run's labelled latents
(`trainer.proposal`) proposes an action sequence from the current frame and the goal in one forward pass. Two
planners of the registry (`planner.planners.PLANNERS`) use it:

* `cem+proposal`: CEM whose initial mean is the proposal's sequence (CEM's usual std around it); the previous plan,
  shifted (the warm start plain CEM starts from), is kept as one candidate of the first iteration;
* `proposal`: the proposal's sequence itself, projected onto the action constraints: no rollout, no search.

Both read an `Observation` (the world model, the current frame's latents, the goal's), passed to
`planner.planners.plan`. The proposal is the run's, loaded on first use (`proposal_for`), or one given with the
observation (a fresh one for `wmctl bench plan`). Legend: H = horizon (frames), A = action width, N = tokens, Z =
token width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from planner.cem import CEMConfig, cem_plan
from planner.core import ActionSpec, CostFn, PlanResult, RolloutFn, WorldModel, project


class Proposal(Protocol):
    """An action sequence from the current frame and the goal (`trainer.proposal.TrainedProposal` implements it)."""

    @property
    def horizon(self) -> int: ...

    def propose(self, current_NZ: torch.Tensor, goal_NZ: torch.Tensor) -> torch.Tensor: ...
        # -> [horizon, A] per-frame actions in the model's raw action space (what the planners search)


@dataclasses.dataclass(frozen=True)
class Observation:
    """What a proposal reads at an MPC step: the world model (its run holds the proposal, its view the cameras),
    the current frame's latents [N, Z] (the context's last frame) and the goal's [N, Z]; `proposal`: one to use
    instead of the run's."""

    wm: WorldModel
    current_NZ: torch.Tensor
    goal_NZ: torch.Tensor
    proposal: Proposal | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProposalPlanConfig:
    """The `proposal` planner's settings: its horizon only (the proposal's own is fitted to it)."""

    horizon: int = 5


def proposal_for(wm: WorldModel) -> Proposal:
    """The proposal trained for `wm`'s run, on its view (loaded once per process; refused, naming the fix, where
    the run has none)."""
    from trainer.proposal import proposal_of  # the run's folder is the trainer's to read

    return proposal_of(wm)


def proposed_actions(obs: Observation, horizon: int) -> torch.Tensor:
    """The proposal's actions [horizon, A] (float32, on the CPU): its sequence cut to `horizon`, or its last action
    repeated past its own horizon (as a warm start is filled)."""
    proposal = obs.proposal if obs.proposal is not None else proposal_for(obs.wm)
    seq = proposal.propose(obs.current_NZ, obs.goal_NZ).float().cpu()
    if len(seq) >= horizon:
        return seq[:horizon]
    return torch.cat([seq, seq[-1:].expand(horizon - len(seq), -1)])


def cem_from_proposal(rollout: RolloutFn, cost: CostFn, spec: ActionSpec, cfg: CEMConfig, *,
                      generator: torch.Generator, proposal_HA: torch.Tensor, init_mean_HA: torch.Tensor | None = None,
                      previous_A: torch.Tensor | None = None, device: str | torch.device = "cpu") -> PlanResult:
    """CEM from the proposal's sequence (the initial mean); the warm start `init_mean_HA`, where there is one, is
    one candidate of the first iteration."""
    extra = init_mean_HA[None] if init_mean_HA is not None else None
    return cem_plan(rollout, cost, spec, cfg, generator=generator, init_mean_HA=proposal_HA, previous_A=previous_A,
                    device=device, candidates_KHA=extra)


def proposal_only(rollout: RolloutFn | None, cost: CostFn, spec: ActionSpec, cfg: Any, *,
                  generator: torch.Generator, proposal_HA: torch.Tensor, init_mean_HA: torch.Tensor | None = None,
                  previous_A: torch.Tensor | None = None, device: str | torch.device = "cpu") -> PlanResult:
    """The proposal's sequence, projected onto the bounds and the per-step change limit (from `previous_A`). No
    rollout: its cost is not computed (NaN), no model is evaluated; `rollout`, `cost`, `generator` and the warm
    start are not used."""
    actions = project(proposal_HA.to(device)[None], spec, None if previous_A is None else previous_A.to(device))[0]
    return PlanResult(actions, float("nan"), [], 0, actions.clone())
