"""A trained world model as the later stages see it: load a run or checkpoint, normalise, roll out.

`LoadedWorldModel` implements the planner's `WorldModel` protocol (`rollout(context, actions) -> latents`)
for both the shortcut dynamics and the teacher-forced baseline, batched over any number of action
sequences. Latents are the store's patch tokens normalised per channel with the run's statistics;
actions are raw actions (in the store's units), converted here exactly as in training.
Legend: B = batch, T = frames, H = horizon, N = tokens per frame, Z = token width, A = action width.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.stage import UserError
from trainer.checkpoint import load_state, load_weights, resolve_checkpoint
from trainer.config import TrainConfig, config_from_dict
from trainer.data import Stats, latents
from trainer.model.dynamics import TokenShape, split_state
from trainer.models import build_model
from trainer.sampling import compile_for_rollouts, rollout_cached, rollout_teacher_forced, rollout_uncached


def newest_run(runs_dir: Path = Path("runs")) -> Path:
    """The most recently updated run folder that has a complete checkpoint."""
    from trainer.checkpoint import latest_checkpoint

    candidates = [p for p in Path(runs_dir).glob("*") if p.is_dir() and latest_checkpoint(p) is not None]
    if not candidates:
        raise UserError(f"no trained run under {runs_dir}/ (train one with `wmctl train`, or pass --run/--ckpt)")
    return max(candidates, key=lambda p: latest_checkpoint(p).stat().st_mtime)


@dataclasses.dataclass
class LoadedWorldModel:
    model: torch.nn.Module
    cfg: TrainConfig
    shape: TokenShape
    stats: Stats
    encoder: dict[str, Any]
    store: Path
    checkpoint: Path
    device: torch.device

    @classmethod
    def load(cls, path: Path, *, weights: str = "ema", device: str = "cpu", compile: bool = False
             ) -> LoadedWorldModel:
        """A checkpoint (or a run: its newest) for inference; `compile`: torch.compile the rollouts' network
        call (`trainer.sampling.compile_for_rollouts`; pays off over many planning steps)."""
        ckpt = resolve_checkpoint(path)
        state = load_state(ckpt)
        cfg = config_from_dict(state["config"])
        shape = TokenShape(**{**state["token_shape"], "grid": tuple(state["token_shape"]["grid"])})
        model = build_model(cfg.model, shape)
        model.load_state_dict(load_weights(ckpt, weights))
        dev = torch.device(device)
        model = model.to(dev).eval().requires_grad_(False)
        if compile:
            compile_for_rollouts(model)
        return cls(model, cfg, shape, Stats.from_dict(state["stats"]),
                   state["encoder"], Path(state["store"]), ckpt, dev)

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.cfg.model.kind

    @property
    def window(self) -> int:
        """Frames the model attends to: its training window (the teacher-forced model takes one fewer)."""
        return self.cfg.max_context() - (1 if self.kind == "teacher_forced" else 0)

    @property
    def frame_action_dim(self) -> int:
        return self.shape.action_dim

    @property
    def frameskip(self) -> int:
        return self.cfg.frameskip

    @property
    def action_mode(self) -> str:
        return self.cfg.action_mode

    @property
    def action_dim(self) -> int:
        """Raw action width per env step (the model consumes frameskip of them per frame)."""
        return self.shape.action_dim // self.cfg.frameskip

    @property
    def name(self) -> str:
        return f"{self.checkpoint.parent.parent.name}/{self.checkpoint.name}"

    # ------------------------------------------------------------------ conversions
    @property
    def state_dim(self) -> int:
        """Width of the state the model takes and predicts (proprioception); 0 for none."""
        return self.shape.state_dim

    def normalize(self, tokens: np.ndarray | torch.Tensor, state: np.ndarray | torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Store patch tokens [..., C, P, Z] or [..., P, Z] (+ raw states [..., S] for a model with
        proprioception) -> normalised latents [..., N, Z] (float32), the state as the last token."""
        try:
            z = latents(np.asarray(tokens), None if state is None else np.asarray(state), self.stats, self.shape)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        return torch.from_numpy(z).to(self.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [..., N, Z] -> raw patch tokens [..., P, Z] (the state token dropped)."""
        z = split_state(z, self.shape)[0]
        mean = torch.from_numpy(self.stats.token_mean).to(z.device)
        std = torch.from_numpy(self.stats.token_std).to(z.device)
        return z * std + mean

    def state_of(self, z: torch.Tensor) -> torch.Tensor | None:
        """Raw states [..., S] predicted in normalised latents [..., N, Z] (None without proprioception)."""
        s = split_state(z, self.shape)[1]
        if s is None:
            return None
        return s * torch.from_numpy(self.stats.state_std).to(s) + torch.from_numpy(self.stats.state_mean).to(s)

    def action_inputs(self, raw_TA: np.ndarray | torch.Tensor, state_TS: np.ndarray | torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Raw actions [..., steps, A] (+ states for `relative_to_state`) -> normalised [..., steps, A]."""
        a = torch.as_tensor(np.asarray(raw_TA), dtype=torch.float32)
        if self.cfg.action_mode == "relative_to_state":
            if state_TS is None:
                raise ValueError("this model takes actions relative to the state: pass the states too")
            s = torch.as_tensor(np.asarray(state_TS), dtype=torch.float32)
            k = min(a.shape[-1], s.shape[-1])
            a = torch.cat([a[..., :k] - s[..., :k], a[..., k:]], dim=-1)
        mean, std = torch.from_numpy(self.stats.action_mean), torch.from_numpy(self.stats.action_std)
        return ((a - mean) / std).to(self.device)

    def frame_actions(self, steps_BSA: torch.Tensor) -> torch.Tensor:
        """Normalised per-step actions [B, (T-1)*frameskip, A] -> per-frame inputs [B, T, A*frameskip]
        (frame t gets the frameskip steps that lead into it; frame 0 gets zeros, marked invalid)."""
        fs = self.cfg.frameskip
        B, S, A = steps_BSA.shape
        if S % fs:
            raise ValueError(f"{S} action steps is not a multiple of frameskip {fs}")
        per_frame = steps_BSA.reshape(B, S // fs, fs * A)
        return torch.cat([torch.zeros(B, 1, fs * A, device=steps_BSA.device), per_frame], dim=1)

    # ------------------------------------------------------------------ the protocol
    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """A box for planning in the model's per-frame action space: the training actions' mean +- 2.5 std."""
        m = np.tile(self.stats.action_mean, self.cfg.frameskip).astype(np.float64)
        s = np.tile(self.stats.action_std, self.cfg.frameskip).astype(np.float64)
        return m - 2.5 * s, m + 2.5 * s

    def plan_rollout(self, context_TNZ: torch.Tensor, actions_SHA: torch.Tensor, *, grad: bool = False,
                     context_actions_TA: torch.Tensor | None = None, k: int = 4, seed: int = 0) -> torch.Tensor:
        """The planner's view: one context [Tc, N, Z] (normalised), S candidate sequences of H per-frame
        actions [S, H, A*frameskip] in the model's raw action space (after its action_mode transform), and
        optionally the actions that led into the context frames [Tc, A*frameskip]. All candidates meet the
        same sampling noise. Returns normalised latents [S, H, N, Z] (with proprioception the last token is
        the predicted state); differentiable when `grad`."""
        S, H, _ = actions_SHA.shape
        Tc = context_TNZ.shape[0]
        mean = torch.from_numpy(np.tile(self.stats.action_mean, self.cfg.frameskip)).to(actions_SHA)
        std = torch.from_numpy(np.tile(self.stats.action_std, self.cfg.frameskip)).to(actions_SHA)
        planned = (actions_SHA - mean) / std
        ctx_a = torch.zeros(S, Tc, planned.shape[-1], device=planned.device)
        ctx_v = torch.zeros(S, Tc, dtype=torch.bool, device=planned.device)
        if context_actions_TA is not None:
            ctx_a = ((context_actions_TA.to(planned) - mean) / std).expand(S, -1, -1)
            ctx_v[:, 1:] = True
        acts = torch.cat([ctx_a, planned], dim=1)
        valid = torch.cat([ctx_v, torch.ones(S, H, dtype=torch.bool, device=planned.device)], dim=1)
        ctx = context_TNZ[None].expand(S, -1, -1, -1)
        with torch.set_grad_enabled(grad):
            if self.kind == "teacher_forced":
                return rollout_teacher_forced(self.model, ctx, acts, valid, horizon=H, window=self.window)
            return rollout_cached(self.model, ctx, acts, valid, horizon=H, k=k, ctx_noise=self.cfg.ctx_noise,
                                  window=self.window, generator=torch.Generator().manual_seed(seed),
                                  shared_noise=True)

    @torch.no_grad()
    def rollout(self, context_BTNZ: torch.Tensor, actions_BTA: torch.Tensor | None, *, horizon: int,
                valid_BT: torch.Tensor | None = None, k: int = 4, generator: torch.Generator | None = None,
                cached: bool = True) -> torch.Tensor:
        """Predict `horizon` frames after the context. actions[:, t] is the (normalised, per-frame) action that
        leads into frame t, covering context + horizon; None or valid=False is the null action. A context of
        batch 1 is broadcast over a batch of action sequences. Returns normalised latents [B, H, N, Z]."""
        B = actions_BTA.shape[0] if actions_BTA is not None else context_BTNZ.shape[0]
        if context_BTNZ.shape[0] == 1 and B > 1:
            context_BTNZ = context_BTNZ.expand(B, -1, -1, -1)
        if actions_BTA is not None and valid_BT is None:
            valid_BT = torch.ones(actions_BTA.shape[:2], dtype=torch.bool, device=actions_BTA.device)
            valid_BT[:, 0] = False
        if self.kind == "teacher_forced":
            return rollout_teacher_forced(self.model, context_BTNZ, actions_BTA, valid_BT, horizon=horizon,
                                          window=self.window)
        g = generator or torch.Generator().manual_seed(0)
        fn = rollout_cached if cached else rollout_uncached
        return fn(self.model, context_BTNZ, actions_BTA, valid_BT, horizon=horizon, k=k,
                  ctx_noise=self.cfg.ctx_noise, window=self.window, generator=g)


def run_store(run_or_ckpt: Path) -> Path:
    """The store a run was trained on (from its store.json, else its checkpoint state)."""
    p = Path(run_or_ckpt)
    run = p if (p / "store.json").exists() else p.parent.parent
    if (run / "store.json").exists():
        return Path(json.loads((run / "store.json").read_text())["store"])
    return Path(load_state(resolve_checkpoint(p))["store"])
