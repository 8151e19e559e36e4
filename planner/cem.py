"""The cross-entropy method over action sequences, fully batched (one rollout of all samples per iteration)."""

from __future__ import annotations

import dataclasses

import torch

from planner.core import ActionSpec, CostFn, PlanResult, RolloutFn, project


@dataclasses.dataclass(frozen=True, kw_only=True)
class CEMConfig:
    horizon: int = 5
    samples: int = 64
    elites: int = 8
    iterations: int = 5
    init_std: float = 0.5  # as a fraction of half the action range
    min_std: float = 0.02  # idem, a floor so the search never collapses to a point
    momentum: float = 0.0  # mean/std <- momentum * old + (1 - momentum) * elite statistics

    def __post_init__(self) -> None:
        if not 0 < self.elites <= self.samples or self.iterations < 1 or self.horizon < 1:
            raise ValueError("need 0 < elites <= samples, iterations >= 1, horizon >= 1")


def warm_start(previous_mean_HA: torch.Tensor | None, executed: int, horizon: int, dim: int) -> torch.Tensor | None:
    """Shift the previous plan by the steps executed; repeat its last action to fill the horizon."""
    if previous_mean_HA is None:
        return None
    rest = previous_mean_HA[executed:]
    if len(rest) == 0:
        return None
    pad = rest[-1:].expand(horizon - len(rest), dim) if len(rest) < horizon else rest[:0]
    return torch.cat([rest[:horizon], pad])


@torch.no_grad()
def cem_plan(rollout: RolloutFn, cost: CostFn, spec: ActionSpec, cfg: CEMConfig, *, generator: torch.Generator,
             init_mean_HA: torch.Tensor | None = None, previous_A: torch.Tensor | None = None,
             device: str | torch.device = "cpu") -> PlanResult:
    """Minimise cost(rollout(a), a) over a [H, A] within `spec`.

    mean, std: [H, A]; each iteration samples [S, H, A] = mean + std * eps (sample 0 is the mean itself),
    projects them onto the constraints, rolls all of them out at once, and refits mean/std to the elites.
    """
    lo, hi, _ = spec.tensors(device)
    half = (hi - lo) / 2
    H, A = cfg.horizon, spec.dim
    mean = init_mean_HA.to(device).clone() if init_mean_HA is not None else ((lo + hi) / 2).expand(H, A).clone()
    std = (cfg.init_std * half).expand(H, A).clone()
    best_a, best_c, trace = None, float("inf"), []
    for _ in range(cfg.iterations):
        eps = torch.randn((cfg.samples, H, A), generator=generator).to(device)
        eps[0] = 0.0
        cand = project(mean + std * eps, spec, previous_A)  # [S, H, A]
        c = cost(rollout(cand), cand)  # [S]
        top = torch.topk(-c, cfg.elites).indices
        elites = cand[top]  # [E, H, A]
        if float(c[top[0]]) < best_c:
            best_c, best_a = float(c[top[0]]), cand[top[0]].clone()
        new_mean, new_std = elites.mean(0), elites.std(0, unbiased=False)
        mean = cfg.momentum * mean + (1 - cfg.momentum) * new_mean
        std = torch.maximum(cfg.momentum * std + (1 - cfg.momentum) * new_std, cfg.min_std * half)
        trace.append(best_c)
    return PlanResult(best_a, best_c, trace, cfg.samples * cfg.iterations, mean)
