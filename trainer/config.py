"""Training configs and named presets (`tiny`, `small`, `base`). Frozen, keyword-only, validated here.

A run saves its full config beside its checkpoints; `wmctl train --set key=value` changes single fields
(an unknown key is an error, never a silently ignored typo).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.overrides import coerce
from pipeline.stage import ConfigMismatchError, UserError, config_differences, to_jsonable
from trainer.actions import ACTION_MODES
from trainer.model_config import ModelConfig
from trainer.precision import check_precision

EARLY_STOP_METRICS = ("val_pred_mse", "val_loss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    store: Path = Path("tokens.zarr")
    out: Path | None = None  # None: a new folder under runs/
    model: ModelConfig = ModelConfig()
    sources: tuple[str, ...] = ()  # store sources to train on (default all)
    # data
    context_frames: int = 16
    frameskip: int = 1  # store frames per model frame (set from `fps` when that is given)
    fps: float | None = None  # the model rate: frameskip = each source's stored fps / fps (`sources.resolve_rate`)
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
    # proprioception (DINO-WM): the normalised state is one more latent token, fed and predicted with the
    # patches; `state_weight` weighs its squared error against the patches' in the loss (and planners' cost)
    proprio: bool = False
    state_weight: float = 1.0
    stats_frames: int = 2048  # frames sampled for the token normalisation statistics
    num_workers: int = 0
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
    # optimisation
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
    device: str = "auto"
    # bookkeeping
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
    init_from: Path | None = None  # fine-tune: start from this run/checkpoint (EMA weights)
    finetune_lr_scale: float = 0.3

    def __post_init__(self) -> None:
        if self.context_frames < 2:
            raise UserError("context_frames must be >= 2")
        if self.labelled_fraction is not None and not 0.0 <= self.labelled_fraction <= 1.0:
            raise UserError("labelled_fraction must be in [0, 1] (or null: the mix weights decide)")
        if not 0.0 <= self.action_dropout <= 1.0:
            raise UserError("action_dropout must be in [0, 1]")
        if any(w < 0 for _, w in self.mix_weights) or (self.mix_weights and not sum(w for _, w in self.mix_weights)):
            raise UserError(f"mix_weights {list(self.mix_weights)}: weights must be >= 0 and not all 0")
        for name in ("bootstrap_fraction", "clean_history_prob", "ctx_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1]")
        if self.context_mode not in ("diffusion_forcing", "clean_context"):
            raise UserError(f"context_mode {self.context_mode!r}: choose diffusion_forcing or clean_context")
        if self.action_mode not in ACTION_MODES:
            raise UserError(f"action_mode {self.action_mode!r}: choose one of {ACTION_MODES}")
        if not 0.0 < self.loss_weight_floor <= 1.0:
            raise UserError(f"loss_weight_floor {self.loss_weight_floor}: must be in (0, 1] (0.1: Dreamer 4's ramp, "
                            "1: every signal level weighted alike)")
        if self.tau_sampling not in ("uniform", "logit_normal"):
            raise UserError(f"tau_sampling {self.tau_sampling!r}: choose uniform or logit_normal")
        check_precision(self.precision)
        from trainer.tracking import TRACKERS

        if self.tracker not in TRACKERS:
            raise UserError(f"tracker {self.tracker!r}: choose one of {', '.join(TRACKERS)}")
        if not self.wandb_project or any(not t or len(t) > 64 for t in self.wandb_tags):
            raise UserError(f"wandb_project {self.wandb_project!r} must not be empty and wandb_tags {self.wandb_tags} "
                            "must each be 1-64 characters (W&B's limits)")
        if self.state_weight < 0:
            raise UserError("state_weight must be >= 0")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.frameskip < 1:
            raise UserError("steps, batch_size, grad_accum and frameskip must be >= 1")
        if self.keep_last < 1 or self.ckpt_every < 1:
            raise UserError("keep_last and ckpt_every must be >= 1")
        if self.early_stop_patience < 0 or self.early_stop_metric not in EARLY_STOP_METRICS:
            raise UserError(f"early_stop_patience {self.early_stop_patience} must be >= 0 and early_stop_metric one "
                            f"of {EARLY_STOP_METRICS} (got {self.early_stop_metric!r})")
        if self.model.kind == "deterministic" and (self.ctx_noise != 0 or self.context_mode != "clean_context"):
            raise UserError("the deterministic control trains and rolls out on a clean context: it needs "
                            "ctx_noise=0 and context_mode=clean_context (--model deterministic sets both)")
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

    def tau_max_at(self, step: int) -> float:
        tau = 1.0
        for s, t in sorted(self.tau_max_schedule):
            if step >= s:
                tau = t
        return tau

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to min_lr_ratio * lr (pure function of the step)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------- presets
def tiny() -> TrainConfig:
    """Tests: seconds on a CPU."""
    return TrainConfig(
        model=ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, registers=2, time_every=2, k_max=8),
        context_frames=4, steps=20, batch_size=4, warmup_steps=5, lr=1e-3, log_every=5, eval_every=10,
        val_windows=8, ckpt_every=10, stats_frames=256, ema_decay=0.9,
    )


def small() -> TrainConfig:
    """CPU demo: minutes on two cores on the built-in pusht tokens (96 px, 6x6 grid merged to 3x3).

    clean_context and state-relative actions: on pusht these learned motion where Dreamer 4's diffusion forcing
    with absolute targets only learned to copy the last frame; proprioception gives the agent's position, which
    the patches of a 96-px frame barely resolve (docs/world-model.md, "Where the `small` preset departs from
    Dreamer 4"). No preconditioning (plain x-prediction): with it the samples were over-dispersed and got worse with
    more sampling steps, on the toy world (`scripts/shortcut_study.py`) and on the demo data (docs/results.md,
    2026-11-30, "Preconditioning on the toy world"). Actions added to every latent token (`conditioning="add"`): on
    the toy world the model's mean prediction came to the true conditional mean, on the demo the predicted robot
    state came closer to the truth, and the closed loop was no worse on the same trials (docs/results.md, 2026-11-30:
    "What the shortcut model learns: the toy world", "The demo's tokens at 600 steps", "Actions added to every
    token"). Loss: the signal-level weight 0.5 + 0.5 tau (Dreamer 4's ramp has floor 0.1) and the state token's
    error at a tenth of the patches' (DINO-WM weighs them alike), 2000 steps: on the demo's tokens (two seeds) the
    only recipe measured whose patches beat copy-last and the deterministic control trained as long at every horizon
    and gain from the actions by more than the seed spread (docs/results.md, 2026-12-01, "The `small` recipe against
    the targets"); the state is predicted less closely.
    """
    return TrainConfig(
        model=ModelConfig(dim=128, depth=4, heads=4, kv_heads=2, registers=4, time_every=2, k_max=16,
                          merge_2x2=True, precondition=False, conditioning="add"),
        context_frames=8, frameskip=2, steps=2000, batch_size=16, warmup_steps=50, lr=1e-3, weight_decay=0.05,
        loss_weight_floor=0.5, state_weight=0.1,
        labelled_fraction=0.5, context_mode="clean_context", action_mode="relative_to_state", proprio=True,
        log_every=25,
        eval_every=200, val_windows=64, ckpt_every=200, ema_decay=0.99, num_workers=1,
    )


def base() -> TrainConfig:
    """The GPU config of the design: dim 768, 24 layers, 16 heads, 8 registers, 64 then 160 context frames."""
    return TrainConfig(
        model=ModelConfig(dim=768, depth=24, heads=16, kv_heads=4, registers=8, time_every=4, k_max=64,
                          merge_2x2=True, softcap=None),
        context_frames=64, context_schedule=((60_000, 160),), steps=100_000, batch_size=8, lr=1e-4,
        warmup_steps=2000, bootstrap_start=5000, precision="auto", log_every=50, eval_every=2000,
        val_windows=128, ckpt_every=2000, keep_last=3, num_workers=4, ema_decay=0.9999,
    )


def dinowm() -> TrainConfig:
    """The DINO-WM baseline for `--model teacher-forced` (Zhou et al. 2025, the released code's predictor): a
    frame-causal ViT of depth 6, 16 heads, full attention inside and across the 3 history frames it sees,
    action and proprio embedded to 10 channels each and concatenated to every patch token, no 2x2 merge,
    frameskip 5, batch 32, lr 5e-4 (the code's; the paper's table says 5e-5). Width 512 keeps the predictor at
    DINO-WM's ~19M parameters on ViT-B/16 tokens (768 wide; DINO-WM's 404 = 384 + 10 + 10 on ViT-S).
    Differences: 2-D RoPE within a frame plus learned frame embeddings (DINO-WM: one learned embedding per
    frame and patch), SwiGLU MLPs, no dropout, and a learned null action for action-free clips (DINO-WM has
    none). Set frameskip and the data fields like the shortcut run it is compared with (`--set frameskip=...`)."""
    return TrainConfig(
        model=ModelConfig(kind="teacher_forced", dim=512, depth=6, heads=16, kv_heads=16, mlp_ratio=4.0,
                          registers=0, softcap=None, merge_2x2=False, conditioning="concat", concat_dim=10),
        context_frames=4, frameskip=5, steps=20_000, batch_size=32, lr=5e-4, warmup_steps=500, weight_decay=0.05,
        log_every=50, eval_every=1000, val_windows=64, ckpt_every=1000, ema_decay=0.999, num_workers=2,
    )


PRESETS = {"tiny": tiny, "small": small, "base": base, "dinowm": dinowm}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------- overrides
def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`key=value` or `model.key=value` pairs -> a new config; unknown keys are errors."""
    changes: dict[str, Any] = {}
    model_changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected key=value")
        target, table, name = (model_changes, model_fields, key[6:]) if key.startswith("model.") else \
            (changes, fields, key)
        if name not in table or name == "model":
            raise UserError(f"--set {key}: unknown field; known: {', '.join(sorted(table))}")
        try:
            target[name] = coerce(value, table[name].type)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise UserError(f"--set {key}={value}: {e}") from None
    if model_changes:
        changes["model"] = dataclasses.replace(cfg.model, **model_changes)
    return dataclasses.replace(cfg, **changes)


def train_config(preset_name: str | None, *, kind: str | None = None,
                 overrides: list[str] | tuple[str, ...] = (), base: TrainConfig | None = None,
                 **fields: Any) -> TrainConfig:
    """A preset (or `base`, a resumed run's saved config) with what the command line gave: the model kind
    (`teacher-forced` or `teacher_forced`; None keeps the preset's), `fields` (None or empty keeps the preset's),
    then `--set key=value`. `deterministic` also sets what the control needs (clean context, no noise).
    With `base`, a preset named too must describe the same run (what is learned), or it is refused."""

    def build(start: TrainConfig) -> TrainConfig:
        changes = {k: v for k, v in fields.items() if v is not None and v != ()}
        if kind is not None:
            new_kind = kind.replace("-", "_")
            # a preset's shortcut conditioning `add` is not the teacher-forced model's: its size, actions as tokens
            cond = "token" if new_kind == "teacher_forced" and start.model.conditioning == "add" else \
                start.model.conditioning
            changes["model"] = dataclasses.replace(start.model, kind=new_kind, conditioning=cond)
            if changes["model"].kind == "deterministic":
                changes.update(ctx_noise=0.0, context_mode="clean_context")
        return apply_overrides(dataclasses.replace(start, **changes), list(overrides))

    if base is None:
        return build(preset(preset_name or "small"))
    cfg = build(base)
    if preset_name is not None:
        diffs = learned_differences(to_jsonable(cfg), to_jsonable(build(preset(preset_name))))
        if diffs:
            raise ConfigMismatchError(f"the run being resumed (against --preset {preset_name})", diffs,
                                      "Resume with `--out RUN --resume` alone: the run's saved config is used")
    return cfg


# config fields that may change when resuming: bookkeeping, not what is learned (the store may move, e.g. to
# node-local disk; its encoder identity is checked instead of its path)
RESUMABLE_FIELDS = {"steps", "log_every", "eval_every", "ckpt_every", "keep_last", "num_workers", "val_windows",
                    "out", "device", "compile", "store", "tracker", "wandb_project", "wandb_entity", "wandb_tags"}


def learned_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`config_differences` of a run's saved config and a new one, less the fields a resumed run may change. A new
    config that names no mix weights takes the run's (they are resolved when a run starts). A config saved by an
    older wmctl is read as this one reads it: renamed fields under their new names, new fields at their defaults
    (the values the old code had built in)."""
    try:
        old = to_jsonable(config_from_dict(old))
    except TypeError:  # a field this version no longer has: compared as saved, so the difference is named
        pass
    for key in ("mix_weights", "action_kinds", "source_frameskip"):  # resolved when the run started
        if not new.get(key):
            new = {**new, key: old.get(key, [])}
    return [d for d in config_differences(old, new) if d.split(":")[0].split(".")[0] not in RESUMABLE_FIELDS]


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of `to_jsonable(cfg)` (for configs saved in runs and checkpoints)."""
    d = dict(d)
    model = ModelConfig(**d.pop("model"))
    if "loss_weight" in d:  # runs saved before the floor: "ramp" (Dreamer 4's) or "uniform"
        d["loss_weight_floor"] = {"ramp": 0.1, "uniform": 1.0}[d.pop("loss_weight")]
    for key in ("store", "out", "init_from"):
        if d.get(key) is not None:
            d[key] = Path(d[key])
    for key in ("sources", "betas", "context_schedule", "tau_max_schedule", "mix_weights", "action_kinds",
                "source_frameskip", "wandb_tags"):
        d[key] = tuple(tuple(x) if isinstance(x, list) else x for x in d.get(key, ()))
    return TrainConfig(model=model, **d)
