"""The training objective of each world model on a batch, and the in-loop one-step prediction.

Shortcut model: per-sample noise and (tau, d) from generators seeded by the sample id (so a sample's noise does
not depend on the batch it is in, and a resumed run continues exactly), then Dreamer 4's shortcut-forcing loss
(`trainer.losses`). Teacher-forced baseline: next-frame MSE. Deterministic control: the shortcut network's
one-step next-frame prediction from a clean context, MSE. Legend: B = batch, T = frames, N = tokens, Z = width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from trainer.config import TrainConfig
from trainer.data import ACTIONS, EMBODIMENT, PRESENT, VALID, Z
from trainer.losses import TauSampling, next_frame_loss, sample_tau_d, shortcut_forcing_loss, teacher_forcing_loss
from trainer.sampling import rollout_cached, rollout_teacher_forced, sampling_steps
from trainer.tokens import FULL_FRAME, FrameLayout, frame_error


def tau_spec(cfg: TrainConfig, step: int) -> TauSampling:
    return TauSampling(k_max=cfg.model.k_max, distribution=cfg.tau_sampling, mean=cfg.tau_mean, std=cfg.tau_std,
                       power=cfg.tau_power, tau_max=cfg.tau_max_at(step), flow_only=step < cfg.bootstrap_start,
                       bootstrap_fraction=cfg.bootstrap_fraction, clean_history_prob=cfg.clean_history_prob,
                       history_tau=1.0 - cfg.ctx_noise)


def compute_loss(model: nn.Module, batch: dict[str, Any], cfg: TrainConfig, step: int, *,
                 core: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective on one batch. `model` may be DDP-wrapped; `core` is the bare module used for the
    stop-gradient bootstrap passes (they need no gradient synchronisation)."""
    core = core or model
    z, actions, valid = batch[Z], batch[ACTIONS], batch[VALID]
    shape = core.shape
    layout = batch_layout(batch)

    def err(diff, rows=None):  # over the cameras (and state channels) each sample's robot has
        return frame_error(diff, shape, cfg.state_weight, layout if rows is None else layout.rows(rows))

    if cfg.model.kind == "teacher_forced":
        return teacher_forcing_loss(lambda zz: model(zz, actions[:, 1:], valid[:, 1:], layout=layout), z, err=err)
    if cfg.model.kind == "deterministic":
        return next_frame_loss(lambda zz, tau_, d_: model(zz, tau_, d_, actions, valid, z, 1.0, layout=layout), z,
                               err=err)
    B, T, N, Zd = z.shape
    clean_context = cfg.context_mode == "clean_context"
    z0, tau, d, eps = noise_like((N, Zd), T, batch["sample_ids"], cfg.seed, tau_spec(cfg, step), device=z.device,
                                 dtype=z.dtype, context_noise=clean_context)
    ctx = None
    if clean_context:  # the frames as generation sees its history
        ctx = (1 - cfg.ctx_noise) * z + cfg.ctx_noise * eps

    def f(z_tau, tau_, d_, rows=None):
        """The network on (a subset `rows` of) the batch, its conditioning taken along."""
        net = model if torch.is_grad_enabled() else core
        a, v, c, cm = (actions, valid, ctx, layout) if rows is None else \
            (actions[rows], valid[rows], None if ctx is None else ctx[rows], layout.rows(rows))
        if c is None:
            return net(z_tau, tau_, d_, a, v, layout=cm)
        return net(z_tau, tau_, d_, a, v, c, 1.0 - cfg.ctx_noise, layout=cm)

    return shortcut_forcing_loss(f, z, z0, tau, d, k_max=cfg.model.k_max, err=err, floor=cfg.loss_weight_floor,
                                 first_frame=cfg.first_frame_loss or not clean_context)


@torch.no_grad()
def predict_last_frame(model: nn.Module, batch: dict[str, Any], cfg: TrainConfig, *, k: int = 4,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Predict frame T-1 of each window from frames 0..T-2 (and the actions) -> [B, N, Z]."""
    z, actions, valid = batch[Z], batch[ACTIONS], batch[VALID]
    T = z.shape[1]
    layout = batch_layout(batch)
    if cfg.model.kind == "teacher_forced":
        return rollout_teacher_forced(model, z[:, :-1], actions, valid, horizon=1, window=T - 1, layout=layout)[:, 0]
    k, g = sampling_steps(cfg.model.kind, k, generator or torch.Generator().manual_seed(cfg.seed))
    return rollout_cached(model, z[:, :-1], actions, valid, horizon=1, k=k, window=T, ctx_noise=cfg.ctx_noise,
                          generator=g, layout=layout)[:, 0]  # (no gradient: this function runs under torch.no_grad)


def batch_layout(batch: dict[str, Any]) -> FrameLayout:
    """The batch's layout: every camera slot, with a per-sample mask when some sample's source lacks a slot, and
    each sample's embodiment with proprioception across robots (collate leaves out what a batch does not need)."""
    present, embodiment = batch.get(PRESENT), batch.get(EMBODIMENT)
    return FULL_FRAME if present is None and embodiment is None else FrameLayout(None, present, embodiment)


def noise_like(shape_NZ: tuple[int, ...], T: int, sample_ids: torch.Tensor, seed: int, tau_spec: TauSampling, *,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, context_noise: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample noise [B, T, N, Z], (tau, d) [B, T] and, with `context_noise`, the context corruption
    [B, T, N, Z] (else None), all on `device`. Each sample draws from generators seeded by its id, so its noise
    does not depend on the batch it is in (resume and any rank split stay exact): (tau, d) from a small host
    generator, the noise tensors from a generator on the device (no host-side draw, no host-to-device copy)."""
    taus, ds, zs, cs = [], [], [], []
    for sid in sample_ids.tolist():
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(sid))
        tau, d = sample_tau_d(tau_spec, T, g)
        taus.append(tau)
        ds.append(d)
        gd = torch.Generator(device=device).manual_seed(_NOISE_SEED + seed * 1_000_003 + int(sid))
        zs.append(torch.randn((T, *shape_NZ), generator=gd, device=device, dtype=dtype))
        if context_noise:
            cs.append(torch.randn((T, *shape_NZ), generator=gd, device=device, dtype=dtype))
    tau_BT = torch.stack(taus).to(device, non_blocking=True)
    d_BT = torch.stack(ds).to(device, non_blocking=True)
    return torch.stack(zs), tau_BT, d_BT, torch.stack(cs) if context_noise else None


_NOISE_SEED = 1 << 40  # offsets the device generators' seeds from the (tau, d) generators' (no shared stream)
