"""Model construction and the per-model training objective and one-step prediction (used by loop and eval)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from trainer.config import ModelConfig, TrainConfig
from trainer.data import ACTIONS, VALID, Z, noise_like
from trainer.losses import TauSampling, shortcut_forcing_loss, teacher_forcing_loss
from trainer.model.baseline import TeacherForcedPredictor
from trainer.model.dynamics import ShortcutDynamics, TokenShape, frame_error


def build_model(cfg: ModelConfig, shape: TokenShape) -> nn.Module:
    if cfg.kind == "shortcut":
        return ShortcutDynamics(cfg, shape)
    return TeacherForcedPredictor(cfg, shape)


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
    err = functools.partial(frame_error, shape=shape, state_weight=cfg.state_weight)
    if cfg.model.kind == "teacher_forced":
        return teacher_forcing_loss(lambda zz: model(zz, actions[:, 1:], valid[:, 1:]), z, err=err)
    B, T, N, Zd = z.shape
    z0, tau, d, eps = noise_like((N, Zd), T, batch["sample_ids"], cfg.seed, tau_spec(cfg, step))
    z0, tau, d = z0.to(z.device), tau.to(z.device), d.to(z.device)
    ctx = None
    if cfg.context_mode == "clean_context":  # the frames as generation sees its history
        ctx = (1 - cfg.ctx_noise) * z + cfg.ctx_noise * eps.to(z.device)

    def f(z_tau, tau_, d_):
        net = model if torch.is_grad_enabled() else core
        if ctx is None:
            return net(z_tau, tau_, d_, actions, valid)
        return net(z_tau, tau_, d_, actions, valid, ctx, 1.0 - cfg.ctx_noise)

    return shortcut_forcing_loss(f, z, z0, tau, d, k_max=cfg.model.k_max, err=err)


@torch.no_grad()
def predict_last_frame(model: nn.Module, batch: dict[str, Any], cfg: TrainConfig, *, k: int = 4,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Predict frame T-1 of each window from frames 0..T-2 (and the actions) -> [B, N, Z]."""
    from trainer.sampling import rollout_cached, rollout_teacher_forced

    z, actions, valid = batch[Z], batch[ACTIONS], batch[VALID]
    T = z.shape[1]
    if cfg.model.kind == "teacher_forced":
        return rollout_teacher_forced(model, z[:, :-1], actions, valid, horizon=1, window=T - 1)[:, 0]
    g = generator or torch.Generator().manual_seed(cfg.seed)
    return rollout_cached(model, z[:, :-1], actions, valid, horizon=1, k=k, window=T, ctx_noise=cfg.ctx_noise,
                          generator=g)[:, 0]  # (no gradient: this function runs under torch.no_grad)
