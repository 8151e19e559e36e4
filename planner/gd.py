"""Gradient descent on the actions: Adam through the (differentiable) rollout, projected onto the constraints."""

from __future__ import annotations

import dataclasses

import torch

from planner.core import ActionSpec, CostFn, PlanResult, RolloutFn, project


@dataclasses.dataclass(frozen=True, kw_only=True)
class GDConfig:
    horizon: int = 5
    restarts: int = 8  # independent initialisations optimised together (batched)
    iterations: int = 30
    lr: float = 0.1  # as a fraction of half the action range per step (Adam)
    init_std: float = 0.3


def gd_plan(rollout: RolloutFn, cost: CostFn, spec: ActionSpec, cfg: GDConfig, *, generator: torch.Generator,
            init_mean_HA: torch.Tensor | None = None, previous_A: torch.Tensor | None = None,
            device: str | torch.device = "cpu") -> PlanResult:
    """Minimise cost over a [H, A]. The variable is u [R, H, A] in units of half the action range; each step
    takes an Adam step on sum_r cost(project(a_r)) and projects u back onto the constraints."""
    lo, hi, _ = spec.tensors(device)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    H, A, R = cfg.horizon, spec.dim, cfg.restarts
    start = (init_mean_HA.to(device) if init_mean_HA is not None else mid.expand(H, A)).expand(R, H, A)
    noise = torch.randn((R, H, A), generator=generator).to(device) * cfg.init_std
    noise[0] = 0.0
    u = ((start - mid) / half + noise).detach().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=cfg.lr)
    best_a, best_c, trace = None, float("inf"), []
    for _ in range(cfg.iterations):
        a = project(mid + half * u, spec, previous_A)  # [R, H, A]
        c = cost(rollout(a), a)  # [R]
        i = int(torch.argmin(c))
        if float(c[i].detach()) < best_c:
            best_c, best_a = float(c[i].detach()), a[i].detach().clone()
        opt.zero_grad()
        c.sum().backward()
        opt.step()
        with torch.no_grad():  # keep the variable feasible, so Adam's state stays meaningful
            u.copy_((project(mid + half * u, spec, previous_A) - mid) / half)
        trace.append(best_c)
    return PlanResult(best_a, best_c, trace, R * cfg.iterations, best_a.clone())
