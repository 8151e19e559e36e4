"""Losses as pure functions: Dreamer 4 shortcut forcing (Eq. 7), DINO-WM teacher forcing, and the deterministic
control's next-frame x-prediction.

Conventions: tau is the signal level (0 = pure noise, 1 = clean), z_tau = (1 - tau) z0 + tau z1, the
network predicts the clean latents (x-prediction); d is the step size, a power of two 1/2**j with
1/k_max the finest. Legend: B = batch, T = frames, N = tokens, Z = token width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

# (z_tau, tau, d[, rows]) -> z1_hat; `rows` (an index of batch rows) selects the conditioning that goes with a subset
DenoiseFn = Callable[..., torch.Tensor]
# (difference [B, T, N, Z][, rows]) -> squared error per frame [B, T]; `rows` says which samples of the batch the
# difference is of (the bootstrap rows), for errors that depend on the sample (cameras present)
FrameError = Callable[..., torch.Tensor]


def mean_squared(diff_BTNZ: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    return diff_BTNZ.pow(2).mean(dim=(2, 3))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TauSampling:
    """How per-frame (tau, d) are drawn. Dreamer 4 Eq. 4: d ~ 1/U({1, 2, 4, ..., k_max}), tau uniform on the
    grid {0, d, ..., 1 - d}. `logit_normal` draws u ~ sigmoid(N(mean, std)) instead of uniform, `power` warps
    u -> u**power, `tau_max` caps the signal level (a curriculum), `flow_only` uses only d = 1/k_max.
    `bootstrap_fraction`: share of samples whose frames draw d from Eq. 4; the others train the flow term
    only (d = 1/k_max). 1.0 is Dreamer 4's per-frame sampling; the shortcut-model recipe uses 0.25.
    `clean_history_prob`: share of samples trained in the regime generation runs in: the frames before a
    cut are history at the inference context level, the last n ~ Geometric(1/2) keep their own (tau, d)."""

    k_max: int
    distribution: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    power: float = 1.0
    tau_max: float = 1.0
    flow_only: bool = False
    bootstrap_fraction: float = 1.0
    clean_history_prob: float = 0.0  # share of samples whose frames before a random cut sit at `history_tau`
    history_tau: float = 0.9  # the signal level of context frames at inference (1 - ctx_noise)


def sample_tau_d(spec: TauSampling, T: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau [T], d [T]) for one sample, on the dyadic grid."""
    levels = int(math.log2(spec.k_max))
    shortcut_row = bool(torch.rand((), generator=generator) < spec.bootstrap_fraction)
    if spec.flow_only or not shortcut_row:
        j = torch.full((T,), levels)
    else:
        j = torch.randint(0, levels + 1, (T,), generator=generator)
    d = torch.pow(2.0, -j.double())
    if spec.distribution == "uniform":
        u = torch.rand(T, generator=generator, dtype=torch.float64)
    else:
        u = torch.sigmoid(spec.mean + spec.std * torch.randn(T, generator=generator, dtype=torch.float64))
    u = u.pow(spec.power) * spec.tau_max
    tau = torch.minimum(torch.floor(u / d) * d, 1.0 - d)
    if T > 1 and bool(torch.rand((), generator=generator) < spec.clean_history_prob):
        # the noisy suffix is n ~ Geometric(1/2) frames long (one-step prediction half the time), at most T-1
        n = 1
        while n < T - 1 and bool(torch.rand((), generator=generator) < 0.5):
            n += 1
        cut = T - n  # frames < cut are the (nearly clean) history
        tau[:cut] = spec.history_tau
        d[:cut] = 1.0 / spec.k_max
    return tau.float(), d.float()


def _bt(x_BT: torch.Tensor) -> torch.Tensor:
    return x_BT[:, :, None, None]


def shortcut_forcing_loss(f: DenoiseFn, z1_BTNZ: torch.Tensor, z0_BTNZ: torch.Tensor, tau_BT: torch.Tensor,
                          d_BT: torch.Tensor, *, k_max: int, err: FrameError = mean_squared, floor: float = 0.1,
                          first_frame: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dreamer 4 shortcut forcing, Eq. 7, per frame:

    flow (d = 1/k_max):  ||z1_hat - z1||^2
    bootstrap (d > 1/k_max), from two stop-gradient half steps of the same network:
        b' = (f(z_tau, tau, d/2) - z_tau) / (1 - tau),       z' = z_tau + b' d/2
        b'' = (f(z', tau + d/2, d/2) - z') / (1 - tau - d/2)
        (1 - tau)^2 ||(z1_hat - z_tau) / (1 - tau) - sg((b' + b'') / 2)||^2
    each weighted by w(tau) = floor + (1 - floor) tau (Dreamer 4's ramp at the default floor 0.1, 0.9 tau + 0.1;
    floor 1: weight 1 at every level) and averaged over frames and samples.

    f: (z_tau [B,T,N,Z], tau [B,T], d [B,T], rows=None) -> z1_hat; conditioning (actions) is bound inside f, and
    `rows` selects it for the bootstrap passes, which run only on the samples that have a bootstrap frame.
    err: the squared error per frame (default: mean over tokens and channels; with proprioception, the
    patches' mean plus the weighted state error, `trainer.tokens.frame_error`).
    first_frame: False leaves frame 0 out of the loss (in a clean-context window it has no history: the model would
    learn to generate a frame from nothing, which generation never asks of it).
    Returns (loss, aux): aux holds detached terms and `per_sample` [B] (for labelled / action-free logging).
    """
    d_min = 1.0 / k_max
    z_tau = (1 - _bt(tau_BT)) * z0_BTNZ + _bt(tau_BT) * z1_BTNZ
    pred = f(z_tau, tau_BT, d_BT)
    flow_BT = err(pred - z1_BTNZ)
    boot_BT_mask = d_BT > d_min * 1.5
    per_frame = flow_BT
    boot_BT = torch.zeros_like(flow_BT)
    rows = boot_BT_mask.any(dim=1).nonzero().squeeze(1)  # samples with a bootstrap frame: only they need targets
    if len(rows):
        with torch.no_grad():
            zt, tau_r, d_r, mask_r = z_tau[rows], tau_BT[rows], d_BT[rows], boot_BT_mask[rows]
            half = torch.where(mask_r, d_r / 2, d_r)  # other frames keep their own (tau, d) as context
            p1 = f(zt, tau_r, half, rows=rows)
            b1 = (p1 - zt) / (1 - _bt(tau_r))
            z_mid = torch.where(_bt(mask_r), zt + b1 * _bt(half), zt)
            tau_mid = torch.where(mask_r, tau_r + half, tau_r)
            p2 = f(z_mid, tau_mid, half, rows=rows)
            b2 = (p2 - z_mid) / (1 - _bt(tau_mid))
        v_pred = (pred[rows] - zt) / (1 - _bt(tau_r))
        boot_r = (1 - tau_r).pow(2) * err(v_pred - (b1 + b2) / 2, rows)
        boot_BT = boot_BT.index_put((rows,), boot_r.to(boot_BT.dtype))
        per_frame = torch.where(boot_BT_mask, boot_BT, flow_BT)
    weighted_BT = (floor + (1 - floor) * tau_BT) * per_frame
    if not first_frame:
        weighted_BT = weighted_BT[:, 1:]
    loss = weighted_BT.mean()
    flow_mask = ~boot_BT_mask
    aux = {
        "loss": loss.detach(),
        "loss_flow": (flow_BT * flow_mask).sum().detach() / flow_mask.sum().clamp(min=1),
        "loss_boot": (boot_BT * boot_BT_mask).sum().detach() / boot_BT_mask.sum().clamp(min=1),
        "boot_fraction": boot_BT_mask.float().mean().detach(),
        "per_sample": weighted_BT.mean(dim=1).detach(),
    }
    return loss, aux


def teacher_forcing_loss(g: Callable[[torch.Tensor], torch.Tensor], z_BTNZ: torch.Tensor, *,
                         err: FrameError = mean_squared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DINO-WM: frames 0..T-2 (and the actions after them, bound inside g) predict frames 1..T-1; MSE."""
    pred = g(z_BTNZ[:, :-1])
    per_frame = err(pred - z_BTNZ[:, 1:])  # [B, T-1]
    loss = per_frame.mean()
    return loss, {"loss": loss.detach(), "per_sample": per_frame.mean(dim=1).detach()}


def next_frame_loss(f: DenoiseFn, z_BTNZ: torch.Tensor, *, err: FrameError = mean_squared
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The deterministic control: the shortcut network predicts every frame in one step from nothing (input 0 at
    signal level 0, step d = 1), seeing its predecessors clean (bound inside f); MSE on frames 1..T-1 (frame 0
    has no predecessor). The same network and conditioning as shortcut forcing, without noise."""
    B, T = z_BTNZ.shape[:2]
    zeros_BT = torch.zeros(B, T, device=z_BTNZ.device, dtype=z_BTNZ.dtype)
    pred = f(torch.zeros_like(z_BTNZ), zeros_BT, torch.ones_like(zeros_BT))
    per_frame = err(pred[:, 1:] - z_BTNZ[:, 1:])  # [B, T-1]
    loss = per_frame.mean()
    return loss, {"loss": loss.detach(), "per_sample": per_frame.mean(dim=1).detach()}
