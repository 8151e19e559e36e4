"""The cross-entropy method over action sequences, fully batched (one rollout of all samples per iteration).

Plain CEM, and the improvements of iCEM (Pinneri et al. 2020) as options: time-correlated ("coloured", power
~ 1/f^beta) sampling noise, elites carried into the next iteration, a warm start from the previous MPC step
(`warm_start`). Named budgets: `cem_preset`.
"""

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
    noise_beta: float = 0.0  # iCEM: sampling noise with power ~ 1/f^beta along the horizon (0: white; iCEM ~2)
    keep_elites: float = 0.0  # iCEM: share of this iteration's elites re-evaluated among the next one's samples

    def __post_init__(self) -> None:
        if not 0 < self.elites <= self.samples or self.iterations < 1 or self.horizon < 1:
            raise ValueError("need 0 < elites <= samples, iterations >= 1, horizon >= 1")
        if self.noise_beta < 0 or not 0 <= self.keep_elites <= 1:
            raise ValueError("need noise_beta >= 0 and keep_elites in [0, 1]")


# named budgets: `default` (what the demo and the earlier figures use), `dinowm` (DINO-WM's CEM: 300 samples,
# 30 elites, 30 iterations), `icem` (the iCEM recipe at the default's sample count, fewer iterations), `fast`
# (the budget with the best success per millisecond measured on the demo's closed loop at K=4: today iCEM's;
# the figures: docs/results.md, 2026-11-30, "CEM budgets and K on a fresh demo")
CEM_PRESETS = {
    "default": {},
    "dinowm": dict(samples=300, elites=30, iterations=30),
    "icem": dict(samples=64, elites=8, iterations=3, noise_beta=2.0, keep_elites=0.3),
}
CEM_PRESETS["fast"] = CEM_PRESETS["icem"]


def cem_preset(name: str, **overrides) -> CEMConfig:
    if name not in CEM_PRESETS:
        raise ValueError(f"CEM preset {name!r}: one of {sorted(CEM_PRESETS)}")
    return CEMConfig(**{**CEM_PRESETS[name], **overrides})


def coloured_noise(shape_SHA: tuple[int, int, int], beta: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise [S, H, A], unit variance per step, with power spectral density ~ 1/f^beta along H (beta 0:
    white; larger: smoother action sequences, as iCEM samples them)."""
    S, H, A = shape_SHA
    if beta == 0 or H < 2:
        return torch.randn(shape_SHA, generator=generator)
    freqs = torch.fft.rfftfreq(H)
    freqs[0] = freqs[1]  # the constant component gets the lowest frequency's weight, not infinity
    scale = freqs.pow(-beta / 2)
    spec = torch.complex(torch.randn(S, A, len(freqs), generator=generator),
                         torch.randn(S, A, len(freqs), generator=generator)) * scale
    x = torch.fft.irfft(spec, n=H)  # [S, A, H]; the constant component stays: shifting a whole sequence is the
    # slowest change of all
    return (x / x.std().clamp(min=1e-6)).transpose(1, 2).contiguous()


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
             device: str | torch.device = "cpu", candidates_KHA: torch.Tensor | None = None) -> PlanResult:
    """Minimise cost(rollout(a), a) over a [H, A] within `spec`.

    mean, std: [H, A]; each iteration samples [S, H, A] = mean + std * eps (sample 0 is the mean itself),
    projects them onto the constraints, rolls all of them out at once, and refits mean/std to the elites.
    `candidates_KHA`: sequences evaluated among the first iteration's samples (its last K, projected; e.g. the
    previous plan shifted, when the mean starts elsewhere).
    """
    lo, hi, _ = spec.tensors(device)
    half = (hi - lo) / 2
    H, A = cfg.horizon, spec.dim
    mean = init_mean_HA.to(device).clone() if init_mean_HA is not None else ((lo + hi) / 2).expand(H, A).clone()
    std = (cfg.init_std * half).expand(H, A).clone()
    best_a, best_c, trace = None, float("inf"), []
    kept = None  # elites carried over from the iteration before (iCEM); in the first: `candidates_KHA`
    if candidates_KHA is not None and len(candidates_KHA):
        if len(candidates_KHA) >= cfg.samples:
            raise ValueError(f"{len(candidates_KHA)} injected candidates leave no room among {cfg.samples} samples")
        kept = project(candidates_KHA.to(device), spec, previous_A)
    for _ in range(cfg.iterations):
        eps = coloured_noise((cfg.samples, H, A), cfg.noise_beta, generator).to(device)
        eps[0] = 0.0
        cand = project(mean + std * eps, spec, previous_A)  # [S, H, A]
        if kept is not None:  # replace the last samples (sample 0 stays the mean itself)
            cand[cfg.samples - len(kept):] = kept
        c = cost(rollout(cand), cand)  # [S]
        top = torch.topk(-c, cfg.elites).indices
        elites = cand[top]  # [E, H, A]
        n_keep = min(int(round(cfg.keep_elites * cfg.elites)), cfg.samples - 1)
        kept = elites[:n_keep].clone() if n_keep else None
        if float(c[top[0]]) < best_c:
            best_c, best_a = float(c[top[0]]), cand[top[0]].clone()
        new_mean, new_std = elites.mean(0), elites.std(0, unbiased=False)
        mean = cfg.momentum * mean + (1 - cfg.momentum) * new_mean
        std = torch.maximum(cfg.momentum * std + (1 - cfg.momentum) * new_std, cfg.min_std * half)
        trace.append(best_c)
    return PlanResult(best_a, best_c, trace, cfg.samples * cfg.iterations, mean)
