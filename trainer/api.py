"""A trained world model as the later stages see it: load a run or checkpoint, normalise, roll out.

`LoadedWorldModel` implements the planner's `WorldModel` protocol (`rollout(context, actions) -> latents`)
for both the shortcut dynamics and the teacher-forced baseline, batched over any number of action
sequences. Latents are the store's patch tokens normalised per channel with the run's statistics;
actions are raw actions (in the store's units), converted here exactly as in training.
Legend: B = batch, T = frames, H = horizon, N = tokens per frame, Z = token width, A = action width.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.stage import UserError
from trainer.actions import ActionSpace
from trainer.checkpoint import load_weights
from trainer.config import TrainConfig, preset
from trainer.data import Stats, action_space, latents, normalize_patches
from trainer.model import build_model
from trainer.precision import check_precision, uses_bf16
from trainer.runs import RunState, run_dir_of
from trainer.sampling import (
    CapturedRollout,
    compile_for_rollouts,
    frame_noise,
    generate,
    prefill,
    rollout_cached,
    rollout_teacher_forced,
    rollout_uncached,
    sampling_steps,
)
from trainer.sources import source_layout
from trainer.tokens import FULL_FRAME, FrameLayout, TokenShape, split_state

log = logging.getLogger(__name__)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a model runs in for planning: "fp32", "bf16" (the weights cast: on CUDA, and on CPUs with
    native bf16 matrix units, e.g. AVX512-BF16 or AMX, faster per MPC step: docs/results.md, 2026-12-01, "bf16 on a
    CPU"), "auto" (bf16 on CUDA, fp32 on the CPU, as training's `precision`)."""
    check_precision(precision)
    return torch.bfloat16 if uses_bf16(precision, device) else torch.float32


@dataclasses.dataclass
class LoadedWorldModel:
    model: torch.nn.Module
    cfg: TrainConfig
    shape: TokenShape
    stats: Stats
    encoder: dict[str, Any]
    store_path: Path | None  # the token store it was trained on, or given; None: an export loaded without one
    checkpoint: Path  # an export's: `<export>/checkpoints/step-N` (a name; its weights lie at its root)
    device: torch.device
    layout: FrameLayout = FULL_FRAME  # the camera slots and robot of its inputs (`for_source`: one source's)
    # the planner's rollouts as CUDA graphs, one per shape (`use_graphs`); None: eager
    graphs: dict[tuple, CapturedRollout] | None = dataclasses.field(default=None, repr=False)
    capture: bool = True  # with `graphs`: capture on CUDA; False runs the graphs' code eagerly (a check)
    step: int = 0  # the training step of its weights (0: a fresh model)

    def for_source(self, reader: Any, source: str) -> LoadedWorldModel:
        """This model on one source's frames: its store cameras in their slots (the slots it lacks are not
        computed) and, with proprioception across robots, its robot's state. What eval and planning use for
        that source, at its own frameskip (sources stored at other rates take another number of store frames
        per model frame). Refuses a source with a camera slot or robot the model does not have."""
        cfg = dataclasses.replace(self.cfg, frameskip=self.cfg.frameskip_of(source))
        return dataclasses.replace(self, cfg=cfg, layout=source_layout(self.shape, reader, source))

    @classmethod
    def load(cls, path: Path | str, *, weights: str = "ema", device: str = "cpu", compile: bool = False,
             precision: str = "fp32", graphs: bool = False, store: Path | None = None) -> LoadedWorldModel:
        """A checkpoint, a run (its best or newest checkpoint), an exported model (`trainer.export`) or the Hub id
        of one in the local Hugging Face cache, for inference; `store`: the token store commands read (default: a
        run's own; an export names none); `compile`: torch.compile the rollouts' network call
        (`trainer.sampling.compile_for_rollouts`; pays off over many planning steps); `precision`
        (`inference_dtype`): the weights' and the planner's rollouts' dtype; `graphs`: the planner's rollouts as
        CUDA graphs (`use_graphs`)."""
        from trainer.export import ExportedModel, is_export, locate

        path = locate(path)
        if is_export(path):
            exp = ExportedModel.read(path)
            if weights != exp.weights:
                raise UserError(f"{path} holds its {exp.weights} weights only (exported with --weights "
                                f"{exp.weights}): load it with weights={exp.weights!r}")
            cfg, shape, stats, encoder, ckpt, step = exp.config, exp.shape, exp.stats, exp.encoder, exp.checkpoint, \
                exp.step
            state_dict, trained_on = exp.state_dict(), None
        else:
            run = RunState.read(path)
            cfg, shape, stats, encoder, ckpt, step = run.config, run.shape, run.stats, run.encoder, run.checkpoint, \
                run.step
            state_dict, trained_on = load_weights(run.checkpoint, weights), run.store
        model = build_model(cfg.model, shape)
        model.load_state_dict(state_dict)
        dev = torch.device(device)
        model = model.to(dev, inference_dtype(precision, dev)).eval().requires_grad_(False)
        wm = cls(model, cfg, shape, stats, encoder, Path(store) if store else trained_on, ckpt, dev, step=step)
        if compile:
            wm.compile()
        if graphs:
            wm.use_graphs()
        return wm

    @classmethod
    def fresh(cls, preset_name: str, *, grid: tuple[int, int], enc_dim: int, action_dim: int, cameras: int = 1,
              device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedWorldModel:
        """A freshly initialised shortcut model of a preset on `cameras` x `grid` tokens of width `enc_dim`, with
        unit statistics: for timing only (benchmarks), never for predictions."""
        cfg = preset(preset_name)
        shape = TokenShape(cameras=cameras, grid=grid, enc_dim=enc_dim, action_dim=action_dim * cfg.frameskip)
        torch.manual_seed(seed)
        dev = torch.device(device)
        model = build_model(cfg.model, shape).to(dev, dtype).eval().requires_grad_(False)
        stats = Stats(np.zeros(enc_dim, np.float32), np.ones(enc_dim, np.float32), np.zeros(action_dim, np.float32),
                      np.ones(action_dim, np.float32), np.array([0.5], np.float32))
        identity = {"model_id": "random-init", "grid": list(grid), "dim": enc_dim}
        return cls(model, cfg, shape, stats, identity, Path(), Path(f"fresh/{preset_name}"), dev)

    def compile(self) -> None:
        """torch.compile the network call of the rollouts in place (`trainer.sampling.compile_for_rollouts`)."""
        compile_for_rollouts(self.model)

    def use_graphs(self, *, capture: bool = True) -> None:
        """Run the planner's shortcut rollouts (no gradient) as CUDA graphs, captured at a shape's first call and
        replayed after (`trainer.sampling.CapturedRollout`): launch-bound small models stop paying a kernel launch
        per operation. `capture=False` runs the same static-buffer code eagerly (any device; a check, no faster)."""
        if capture and self.device.type != "cuda":
            raise UserError(f"CUDA graphs need a CUDA device, this model is on {self.device}; on a CPU "
                             "torch.compile (--compile) is what speeds the rollouts")
        if self.kind == "teacher_forced":
            log.warning("%s is a teacher-forced model: its rollouts stay eager (CUDA graphs are made for the "
                        "shortcut and deterministic models' cached rollouts)", self.name)
        self.graphs, self.capture = {}, capture

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: the planner's rollouts run in it (contexts are cast to it)."""
        return next(self.model.parameters()).dtype

    @property
    def store(self) -> Path:
        """The token store its commands read: the one given to `load`, else the run's. An export loaded without one
        names none: refused, naming the fix."""
        if self.store_path is None:
            raise UserError(f"{self.name} is an exported model: it names no token store; pass --store STORE (a store "
                            f"made with its encoder, {self.encoder.get('model_id', 'see its encoder.json')})")
        return self.store_path

    @property
    def params_M(self) -> float:
        return sum(p.numel() for p in self.model.parameters()) / 1e6

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.cfg.model.kind

    @property
    def sampler(self) -> bool:
        """True for a generative model (the shortcut dynamics: each rollout is one sample); deterministic models
        (the teacher-forced baseline, the deterministic control) give one answer."""
        return self.kind == "shortcut"

    @property
    def max_context_frames(self) -> int:
        """The most context frames a prediction sees (the rest of the training window is the frame predicted);
        rollouts from a longer context use its last frames."""
        return self.cfg.max_context() - 1

    @property
    def window(self) -> int:
        """Frames the model attends to: its training window (the teacher-forced model takes one fewer)."""
        return self.cfg.max_context() - (1 if self.kind == "teacher_forced" else 0)

    @property
    def actions(self) -> ActionSpace:
        """dataset <-> model <-> environment actions, with this run's statistics (the planner's view)."""
        return action_space(self.cfg, self.stats)

    @property
    def name(self) -> str:
        return f"{run_dir_of(self.checkpoint).name}/{self.checkpoint.name}"

    # ------------------------------------------------------------------ conversions
    @property
    def embodiment(self) -> int:
        """The robot of this view's inputs (0 for a model of one robot)."""
        return int(self.layout.embodiment or 0)

    @property
    def state_dim(self) -> int:
        """Width of the state the model takes and predicts (proprioception; this view's robot's); 0 for none."""
        return self.shape.state_width(self.embodiment) if self.shape.state_dim else 0

    def normalize(self, tokens: np.ndarray | torch.Tensor, state: np.ndarray | torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Store patch tokens [..., C, P, Z] (the camera axis also for one camera; + raw states [..., S] for a
        model with proprioception) -> normalised latents [..., N, Z] (float32), the state as the last token."""
        try:
            z = latents(np.asarray(tokens), None if state is None else np.asarray(state), self.stats, self.shape,
                        self.layout.count(self.shape), self.embodiment)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        return torch.from_numpy(z).to(self.device)

    @torch.no_grad()
    def input_tokens(self, patch_NCPZ: np.ndarray) -> np.ndarray:
        """What the network's input layer makes of store patch tokens [N, C, P, Z] of this view's cameras: normalised,
        merged 2x2 where the model merges, projected to its width -> [N, Q * D] (float32), flattened per frame. The
        feature probe's `model` view: does the scene survive the model's own input projection?"""
        from trainer.model.dynamics import merge_2x2

        io = self.model.io
        z = torch.from_numpy(normalize_patches(patch_NCPZ, self.stats, self.shape, self.layout.count(self.shape)))
        z = z[:, None].to(device=self.device, dtype=self.dtype)  # [N, 1, C*P, Z]
        if self.cfg.model.merge_2x2:
            z = merge_2x2(z, self.shape)
        return io.proj_in(z)[:, 0].flatten(1).float().cpu().numpy()

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
        w = self.state_dim
        mean, scale = self.stats.state_stats(self.embodiment)
        return s[..., :w] * torch.from_numpy(scale[:w]).to(s) + torch.from_numpy(mean[:w]).to(s)

    def action_inputs(self, raw_TA: np.ndarray | torch.Tensor, state_TS: np.ndarray | torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Raw recorded actions [..., steps, A] (+ states for `relative_to_state`) -> the model's raw per-step
        actions [..., steps, A] (`frame_actions` makes them the network's inputs)."""
        a = torch.as_tensor(np.asarray(raw_TA), dtype=torch.float32)
        s = None if state_TS is None else torch.as_tensor(np.asarray(state_TS), dtype=torch.float32)
        return self.actions.from_dataset(a, s).to(self.device)

    def frame_actions(self, steps_BSA: torch.Tensor) -> torch.Tensor:
        """Model per-step actions [B, (T-1)*frameskip, A] -> normalised per-frame inputs [B, T, frame_dim]
        (frame t gets the frameskip steps that lead into it, concatenated or added up by kind; frame 0 gets
        zeros, marked invalid)."""
        per_frame = self.actions.normalize_frames(self.actions.per_frame(steps_BSA))
        return torch.cat([torch.zeros_like(per_frame[:, :1]), per_frame], dim=1)

    # ------------------------------------------------------------------ the protocol
    def planning_rollout(self, context_TNZ: torch.Tensor, *, context_actions_TA: torch.Tensor | None = None,
                         k: int = 4, seed: int = 0) -> Callable[..., torch.Tensor]:
        """The planner's view of one MPC step: one context [Tc, N, Z] (normalised) and optionally the actions that
        led into its frames [Tc, frame_dim] give `rollout(actions_SHA, grad=False)`: S candidate sequences of H
        per-frame actions [S, H, frame_dim] in the model's raw action space (after its action transform) ->
        normalised latents [S, H, N, Z] (with proprioception the last token is the predicted state),
        differentiable when `grad`. The context is committed once here (its keys/values are shared by every
        candidate of every iteration, copied into each call's preallocated cache slots); every call meets the same
        sampling noise (common random numbers). H x K model passes per call at any horizon: past the training
        window the cache slides without re-committing (`trainer.sampling.RingKVCache`)."""
        Tc = context_TNZ.shape[0]
        dev, dt = context_TNZ.device, self.dtype
        context_TNZ = context_TNZ.to(dt)
        ctx_a = torch.zeros(1, Tc, self.actions.frame_dim, device=dev, dtype=dt)
        ctx_v = torch.zeros(1, Tc, dtype=torch.bool, device=dev)
        if context_actions_TA is not None:
            ctx_a = self.actions.normalize_frames(context_actions_TA.to(device=dev, dtype=dt))[None]
            ctx_v[:, 1:] = True
        teacher_forced = self.kind == "teacher_forced"
        k, g = sampling_steps(self.kind, k, torch.Generator().manual_seed(seed))
        if not teacher_forced:
            with torch.no_grad():
                pre = prefill(self.model, context_TNZ[None], ctx_a, ctx_v, ctx_noise=self.cfg.ctx_noise,
                              window=self.window, generator=g, shared_noise=True, layout=self.layout)
            noise_state = g.get_state() if g is not None else None

        def rollout(actions_SHA: torch.Tensor, grad: bool = False) -> torch.Tensor:
            S, H, _ = actions_SHA.shape
            planned = self.actions.normalize_frames(actions_SHA).to(device=dev, dtype=dt)
            acts = torch.cat([ctx_a.expand(S, -1, -1), planned], dim=1)
            valid = torch.cat([ctx_v.expand(S, -1), torch.ones(S, H, dtype=torch.bool, device=dev)], dim=1)
            with torch.set_grad_enabled(grad):
                if teacher_forced:
                    return rollout_teacher_forced(self.model, context_TNZ[None].expand(S, -1, -1, -1), acts, valid,
                                                  horizon=H, window=self.window, layout=self.layout)
                g = None
                if noise_state is not None:
                    g = torch.Generator()
                    g.set_state(noise_state)
                if self.graphs is not None and not grad and self._graphable():
                    noise = frame_noise(S, H, context_TNZ.shape[1:], g, device=dev, dtype=dt, shared_noise=True)
                    key = (S, H, k, Tc, self.layout.slots, self.layout.embodiment, dt)
                    graph = self.graphs.get(key)
                    if graph is None:
                        graph = self.graphs[key] = CapturedRollout(
                            self.model, pre, acts, valid, noise, horizon=H, k=k, ctx_noise=self.cfg.ctx_noise,
                            window=self.window, layout=self.layout, capture=self.capture)
                    return graph(pre, acts, valid, noise)
                return generate(self.model, pre, acts, valid, horizon=H, k=k, ctx_noise=self.cfg.ctx_noise,
                                window=self.window, generator=g, shared_noise=True, cache="ring", layout=self.layout)

        return rollout

    def _graphable(self) -> bool:
        """A layout one graph serves for every candidate: no per-sample cameras or robots."""
        return self.layout.present_BC is None and not torch.is_tensor(self.layout.embodiment)

    def plan_rollout(self, context_TNZ: torch.Tensor, actions_SHA: torch.Tensor, *, grad: bool = False,
                     context_actions_TA: torch.Tensor | None = None, k: int = 4, seed: int = 0) -> torch.Tensor:
        """One call of `planning_rollout` (for a single set of candidates)."""
        return self.planning_rollout(context_TNZ, context_actions_TA=context_actions_TA, k=k, seed=seed)(
            actions_SHA, grad=grad)

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
                                          window=self.window, layout=self.layout)
        k, g = sampling_steps(self.kind, k, generator or torch.Generator().manual_seed(0))
        fn = rollout_cached if cached else rollout_uncached
        return fn(self.model, context_BTNZ, actions_BTA, valid_BT, horizon=horizon, k=k,
                  ctx_noise=self.cfg.ctx_noise, window=self.window, generator=g, layout=self.layout)
