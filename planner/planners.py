"""The one planner registry: which planners there are (`PLANNERS`: CEM, gradient descent, and with the run's amortized
proposal CEM seeded by it and the proposal alone, `planner.proposal`), their settings, and one call that runs the
chosen one (`plan`), so the closed loop (`planner.sim`), offline planning (`planner.offline`) and the MPC step of the
policy and server (`planner.latent_mpc`) never choose between them themselves.

A stage config holds one settings field per planner, named as in `PLANNERS` (`SimConfig.cem`, `SimConfig.gd`), and
the planner's name (`SimConfig.planner`); `settings(name, cfg)` takes the chosen one's (`cem+proposal` shares CEM's;
`proposal` has nothing to set but its horizon, and takes its defaults where a stage config holds no field for it).
The proposal planners read the current frame and the goal: `plan(..., observation=Observation(wm, current, goal))`.
Also here: the action constraints a world model plans under (`spec_for`) and the named budgets of the command line
(`search_configs`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from pipeline.stage import UserError
from planner.cem import CEMConfig, cem_plan, cem_preset
from planner.core import ActionSpec, CostFn, PlanResult, RolloutFn, WorldModel
from planner.gd import GDConfig, gd_plan
from planner.proposal import Observation, ProposalPlanConfig, cem_from_proposal, proposal_only, proposed_actions


@dataclasses.dataclass(frozen=True)
class Planner:
    """A planner: its settings type and its pure, batched plan function (`planner.cem.cem_plan`'s signature).
    `grad`: it differentiates through the rollout (called with grad=True). `field`: its settings' field in a stage
    config (default: its name). `proposal`: it is given the proposal's actions (`proposal_HA`, from the
    observation). `rollout`: it rolls the model out (False: the context need not be committed)."""

    config: type
    run: Callable[..., PlanResult]
    grad: bool = False
    field: str = ""
    proposal: bool = False
    rollout: bool = True


PLANNERS: dict[str, Planner] = {
    "cem": Planner(CEMConfig, cem_plan),
    "gd": Planner(GDConfig, gd_plan, grad=True),
    "cem+proposal": Planner(CEMConfig, cem_from_proposal, field="cem", proposal=True),
    "proposal": Planner(ProposalPlanConfig, proposal_only, proposal=True, rollout=False),
}


def check_planner(name: str) -> str:
    """`name` if it is a planner, else the user's error naming the choices."""
    if name not in PLANNERS:
        *rest, last = PLANNERS
        raise UserError(f"--planner {name!r}: choose {', '.join(rest)} or {last}")
    return name


def settings(name: str, cfg: Any) -> CEMConfig | GDConfig | ProposalPlanConfig:
    """Planner `name`'s settings in a stage config that holds one field per planner (`cfg.cem`, `cfg.gd`); a planner
    with nothing to set but its horizon (`proposal`) takes its defaults where the config holds no field for it."""
    entry = PLANNERS[check_planner(name)]
    field = entry.field or name
    if not hasattr(cfg, field) and entry.config is ProposalPlanConfig:
        return ProposalPlanConfig()
    return getattr(cfg, field)


def plan(name: str, rollout: RolloutFn | None, cost: CostFn, spec: ActionSpec,
         cfg: CEMConfig | GDConfig | ProposalPlanConfig, *, generator: torch.Generator, horizon: int | None = None,
         init_mean_HA: torch.Tensor | None = None, previous_A: torch.Tensor | None = None,
         observation: Observation | None = None, device: str | torch.device = "cpu") -> PlanResult:
    """Minimise cost(rollout(a), a) over a [H, A] within `spec` with planner `name` and its settings `cfg`
    (`horizon`: H, over the settings' own), warm-started from `init_mean_HA`, the first step's change limited
    from `previous_A`, its tensors on `device`. A planner that differentiates gets `rollout(actions, grad=True)`;
    one that uses the proposal reads `observation` (the current frame and the goal); one that rolls nothing out
    (`proposal`) may be given no rollout."""
    entry = PLANNERS[check_planner(name)]
    if not isinstance(cfg, entry.config):
        raise TypeError(f"planner {name} takes a {entry.config.__name__}, got {type(cfg).__name__}")
    if horizon is not None:
        cfg = dataclasses.replace(cfg, horizon=horizon)
    extra = {}
    if entry.proposal:
        if observation is None:  # a caller not wired for it (the planner's name passed every check before)
            raise UserError(f"--planner {name} proposes from the current frame and the goal, which this command "
                            "does not pass to the planner yet: choose cem or gd here")
        extra["proposal_HA"] = proposed_actions(observation, cfg.horizon)
    if entry.rollout and rollout is None:
        raise ValueError(f"planner {name} rolls the model out: pass a rollout")
    fn = functools.partial(rollout, grad=True) if entry.grad else rollout
    return entry.run(fn, cost, spec, cfg, generator=generator, init_mean_HA=init_mean_HA, previous_A=previous_A,
                     device=device, **extra)


def _committed_on_first_call(wm: WorldModel, ctx: torch.Tensor, ctx_actions: torch.Tensor, *, k: int, seed: int):
    """`wm.planning_rollout(ctx, ...)` whose context is committed at its first call, not before: a planner that
    rolls nothing out (`proposal`) never pays for it. The same rollout: its noise comes from `seed` alone."""
    made: list = []

    def rollout(actions_SHA: torch.Tensor, grad: bool = False) -> torch.Tensor:
        if not made:
            made.append(wm.planning_rollout(ctx, context_actions_TA=ctx_actions, k=k, seed=seed))
        return made[0](actions_SHA, grad=grad)

    return rollout


def expected_cost_rollout(wm: WorldModel, ctx: torch.Tensor, ctx_actions: torch.Tensor, cost, *, k: int, seed: int,
                          draws: int = 1):
    """(rollout, cost) for the planner. draws = 1: one sampling-noise draw shared by every candidate and iteration
    (the model's own planning rollout). draws = D > 1: D independent draws (seeds seed..seed+D-1), each shared by every
    candidate, and a candidate's cost is its mean over them: planning on the expected cost under the model's
    uncertainty rather than on one sample of it. A deterministic or teacher-forced model has one outcome: D is 1.
    Each draw's context is committed when the rollout is first called (`_committed_on_first_call`)."""
    if draws == 1 or getattr(wm, "kind", "") == "teacher_forced":
        return _committed_on_first_call(wm, ctx, ctx_actions, k=k, seed=seed), cost
    rollouts = [_committed_on_first_call(wm, ctx, ctx_actions, k=k, seed=seed + d) for d in range(draws)]

    def rollout(actions_SHA: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return torch.stack([r(actions_SHA, grad=grad) for r in rollouts])  # [D, S, H, N, Z]

    def mean_cost(latents_DSHNZ: torch.Tensor, actions_SHA: torch.Tensor) -> torch.Tensor:
        return torch.stack([cost(z, actions_SHA) for z in latents_DSHNZ]).mean(0)  # [S]

    return rollout, mean_cost


def search_configs(planner: str, horizon: int, preset: str = "default", **cem: Any) -> tuple[CEMConfig, GDConfig]:
    """The planners' settings: CEM from a named budget (`planner.cem.CEM_PRESETS`) with `cem` fields over it; GD
    with one restart per 16 CEM samples and 4x the iterations (a gradient step is cheaper than a CEM iteration)."""
    check_planner(planner)
    try:
        c = cem_preset(preset, horizon=horizon, **cem)
    except ValueError as e:
        raise UserError(f"--cem {preset}: {e}") from None
    return c, GDConfig(horizon=horizon, restarts=max(1, c.samples // 16), iterations=c.iterations * 4)


def spec_for(wm: WorldModel, max_delta_fraction: float | None = 0.5) -> ActionSpec:
    """Bounds from the model's training actions; per-step changes limited to a fraction of the range."""
    lo, hi = wm.actions.bounds()
    md = tuple(float(x) for x in (hi - lo) * max_delta_fraction) if max_delta_fraction else None
    return ActionSpec(tuple(float(x) for x in lo), tuple(float(x) for x in hi), md)
