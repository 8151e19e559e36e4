"""The four sections of a training config, each with its own fields, checks and what it computes:

- `DataConfig`: what a window is made of (store, sources, rate, context, the mix, actions, proprioception);
- `ObjectiveConfig`: what the model is trained to do (shortcut forcing's signal levels, loss weights, context noise);
- `OptimConfig`: how it is optimised (steps, batch, learning-rate schedule, EMA, precision, seed, fine-tuning);
- `RunConfig`: where and how the run is kept (folder, device, logging, evals, early stopping, checkpoints, tracker).

`trainer.config.TrainConfig` is the four together with the model (`ModelConfig`): its fields are the sections' fields
(flat, as a run's config.json has always recorded them and as `--set key=value` names them), and code that needs one
section takes that section's type. `config_sections()` says which field is in which section.

Four fields of `DataConfig` are what a run derives when it starts (`trainer.resolve.derive`): `frameskip` (from
`fps`), `source_frameskip`, `action_kinds` and `mix_weights`; the run's config.json records them resolved.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from pipeline.stage import UserError
from trainer.actions import ACTION_MODES
from trainer.precision import check_precision

EARLY_STOP_METRICS = ("val_pred_mse", "val_loss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    store: Path = Path("tokens.zarr")
    sources: tuple[str, ...] = ()  # store sources to train on (default all)
    context_frames: int = 16
    frameskip: int = 1  # store frames per model frame (set from `fps` when that is given)
    fps: float | None = None  # the model rate: frameskip = each source's stored fps / fps (`trainer.derive`)
    # with `fps` and sources stored at different rates: (source, frameskip) of every training source (`frameskip`
    # is then the labelled sources' - the action space's - or the first source's); resolved when a run starts
    source_frameskip: tuple[tuple[str, int], ...] = ()
    # with `fps` and frameskip > 1: per action dimension how a model frame's steps add up (delta | absolute |
    # velocity; from the labelled sources' registry `action_kind`, resolved when a run starts): one action per
    # model frame. Empty: the frame's steps concatenated (frameskip x A wide, runs without `fps`)
    action_kinds: tuple[str, ...] = ()
    context_schedule: tuple[tuple[int, int], ...] = ()  # ((step, frames), ...): curriculum on context length
    # the training mix: each window's source is drawn by `mix_weights` ((source, weight), ...; normalised over the
    # training sources; a source left out takes the registry's `mix_weight` for a dataset of its name, else 1 -
    # resolved when a run starts and recorded in its config.json). `labelled_fraction` overrides it: labelled vs
    # action-free windows at that share, each pool uniform over its windows.
    mix_weights: tuple[tuple[str, float], ...] = ()
    labelled_fraction: float | None = None
    action_dropout: float = 0.0  # share of labelled windows given the null action anyway
    include_augmented: bool = True
    action_mode: str = "absolute"  # absolute | relative_to_state (action - state[:A], e.g. pusht target - agent xy)
    # proprioception (DINO-WM): the normalised state is one more latent token, fed and predicted with the patches
    proprio: bool = False
    stats_frames: int = 2048  # frames sampled for the token normalisation statistics
    num_workers: int = 0

    def check_data(self) -> None:
        if self.context_frames < 2:
            raise UserError("context_frames must be >= 2")
        if self.frameskip < 1:
            raise UserError("frameskip must be >= 1")
        if self.labelled_fraction is not None and not 0.0 <= self.labelled_fraction <= 1.0:
            raise UserError("labelled_fraction must be in [0, 1] (or null: the mix weights decide)")
        if not 0.0 <= self.action_dropout <= 1.0:
            raise UserError("action_dropout must be in [0, 1]")
        if any(w < 0 for _, w in self.mix_weights) or (self.mix_weights and not sum(w for _, w in self.mix_weights)):
            raise UserError(f"mix_weights {list(self.mix_weights)}: weights must be >= 0 and not all 0")
        if self.action_mode not in ACTION_MODES:
            raise UserError(f"action_mode {self.action_mode!r}: choose one of {ACTION_MODES}")
        for step, frames in self.context_schedule:
            if frames < 2 or step < 0:
                raise UserError(f"context_schedule entry ({step}, {frames}): need step >= 0 and frames >= 2")

    def context_at(self, step: int) -> int:
        """Context length at `step` (the last schedule entry whose step has been reached)."""
        frames = self.context_frames
        for s, f in sorted(self.context_schedule):
            if step >= s:
                frames = f
        return frames

    def frameskip_of(self, source: str) -> int:
        """Store frames per model frame of one source (its stored fps / the model's fps)."""
        return dict(self.source_frameskip).get(source, self.frameskip)

    def frameskips(self, sources) -> np.ndarray:
        """`frameskip_of` of each entry of an episode table's source column, as int64 (row by row, not
        `Series.map`: some pandas versions map a pyarrow string column to strings)."""
        return np.array([self.frameskip_of(str(src)) for src in sources], dtype=np.int64)

    def max_context(self) -> int:
        return max([self.context_frames, *(f for _, f in self.context_schedule)])


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    # `state_weight` weighs the proprio token's squared error against the patches' in the loss (and planners' cost)
    state_weight: float = 1.0
    # shortcut forcing
    tau_sampling: str = "uniform"  # uniform on the step grid (Dreamer 4) | logit_normal
    tau_mean: float = 0.0
    tau_std: float = 1.0
    tau_power: float = 1.0  # tau <- tau ** power before snapping (> 1: more noise)
    tau_max_schedule: tuple[tuple[int, float], ...] = ()  # ((step, max signal level), ...): curriculum on tau
    # per-frame loss weight over the signal level, w(tau) = floor + (1 - floor) tau: 0.1 is Dreamer 4's ramp
    # (0.9 tau + 0.1, the near-clean levels count most), 1 weights every level alike (the mostly-noise levels, where
    # the prediction is the conditional mean given context and actions, count as much as the near-clean ones)
    loss_weight_floor: float = 0.1
    bootstrap_start: int = 0  # steps of flow-only training before the bootstrap term
    bootstrap_fraction: float = 0.25  # share of windows trained with per-frame step sizes (1.0: Dreamer 4)
    # diffusion_forcing (Dreamer 4: frames see noisy predecessors) | clean_context (every frame is trained in the
    # generation regime: predecessors at the context level ctx_noise; 2x tokens per window)
    context_mode: str = "diffusion_forcing"
    clean_history_prob: float = 0.0  # diffusion forcing: share of windows with a nearly clean history before a cut
    # clean_context: also train on frame 0, which has no history there and which generation never produces (True:
    # as before; the deterministic control and the teacher-forced baseline never do, so False compares like for like)
    first_frame_loss: bool = True
    ctx_noise: float = 0.1  # context corruption at inference (Dreamer 4: 0.1), also the clean-history level

    def check_objective(self) -> None:
        for name in ("bootstrap_fraction", "clean_history_prob", "ctx_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1]")
        if self.context_mode not in ("diffusion_forcing", "clean_context"):
            raise UserError(f"context_mode {self.context_mode!r}: choose diffusion_forcing or clean_context")
        if not 0.0 < self.loss_weight_floor <= 1.0:
            raise UserError(f"loss_weight_floor {self.loss_weight_floor}: must be in (0, 1] (0.1: Dreamer 4's ramp, "
                            "1: every signal level weighted alike)")
        if self.tau_sampling not in ("uniform", "logit_normal"):
            raise UserError(f"tau_sampling {self.tau_sampling!r}: choose uniform or logit_normal")
        if self.state_weight < 0:
            raise UserError("state_weight must be >= 0")

    def tau_max_at(self, step: int) -> float:
        tau = 1.0
        for s, t in sorted(self.tau_max_schedule):
            if step >= s:
                tau = t
        return tau


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    steps: int = 1000
    batch_size: int = 8  # per rank, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    seed: int = 0
    init_from: Path | None = None  # fine-tune: start from this run/checkpoint (EMA weights)
    finetune_lr_scale: float = 0.3

    def check_optim(self) -> None:
        check_precision(self.precision)
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise UserError("steps, batch_size and grad_accum must be >= 1")

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to min_lr_ratio * lr (pure function of the step)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    out: Path | None = None  # None: a new folder under runs/
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 100
    # early stopping: after this many evals (every `eval_every` steps) without a new best `early_stop_metric` on the
    # val windows, training stops; the best checkpoint is recorded in <run>/best.json and is what `--run RUN`
    # names from then on (0: off, train to `steps`)
    early_stop_patience: int = 0
    early_stop_metric: str = "val_pred_mse"  # a key `validate` reports (lower is better)
    val_windows: int = 32
    ckpt_every: int = 200
    keep_last: int = 3
    tracker: str = "tensorboard"  # none | tensorboard | wandb | trackio (metrics.jsonl is always written)
    # W&B (tracker=wandb; its evals too): the project, the entity (a team or user; None: your default) and the tags
    wandb_project: str = "wmctl"
    wandb_entity: str | None = None
    wandb_tags: tuple[str, ...] = ()

    def check_run(self) -> None:
        from trainer.tracking import TRACKERS

        if self.tracker not in TRACKERS:
            raise UserError(f"tracker {self.tracker!r}: choose one of {', '.join(TRACKERS)}")
        if not self.wandb_project or any(not t or len(t) > 64 for t in self.wandb_tags):
            raise UserError(f"wandb_project {self.wandb_project!r} must not be empty and wandb_tags {self.wandb_tags} "
                            "must each be 1-64 characters (W&B's limits)")
        if self.keep_last < 1 or self.ckpt_every < 1:
            raise UserError("keep_last and ckpt_every must be >= 1")
        if self.early_stop_patience < 0 or self.early_stop_metric not in EARLY_STOP_METRICS:
            raise UserError(f"early_stop_patience {self.early_stop_patience} must be >= 0 and early_stop_metric one "
                            f"of {EARLY_STOP_METRICS} (got {self.early_stop_metric!r})")


SECTIONS = {"data": DataConfig, "objective": ObjectiveConfig, "optimisation": OptimConfig, "run": RunConfig}


def config_sections() -> dict[str, tuple[str, ...]]:
    """Each section's field names, in the order they are declared (the model is its own, `model.*`)."""
    return {name: tuple(f.name for f in dataclasses.fields(cls)) for name, cls in SECTIONS.items()}


def section_of(cfg, name: str):
    """One section of a config alone (a `DataConfig` etc. holding the config's values of that section's fields)."""
    cls = SECTIONS[name]
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
