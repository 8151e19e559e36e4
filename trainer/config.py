"""Training configs and named presets (`tiny`, `small`, `base`). Frozen, keyword-only, validated here.

A run saves its full config beside its checkpoints; `wmctl train --set key=value` changes single fields
(an unknown key is an error, never a silently ignored typo).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.overrides import coerce
from pipeline.stage import ConfigMismatchError, UserError, config_differences, to_jsonable
from trainer.config_sections import DataConfig, ObjectiveConfig, OptimConfig, RunConfig, config_sections
from trainer.model_config import ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig, OptimConfig, ObjectiveConfig, DataConfig):
    """A training run's config: the model and the four sections (`trainer.config_sections`: data, objective,
    optimisation, run), whose fields it holds flat (as config.json records them and `--set` names them). Each
    section checks its own fields; what spans sections is checked here."""

    model: ModelConfig = ModelConfig()

    def __post_init__(self) -> None:
        self.check_data()
        self.check_objective()
        self.check_optim()
        self.check_run()
        if self.model.kind == "deterministic" and (self.ctx_noise != 0 or self.context_mode != "clean_context"):
            raise UserError("the deterministic control trains and rolls out on a clean context: it needs "
                            "ctx_noise=0 and context_mode=clean_context (--model deterministic sets both)")


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
            known = ", ".join(sorted(model_fields)) if target is model_changes else "; ".join(
                f"{section}: {', '.join(sorted(names))}" for section, names in config_sections().items()) + \
                "; model.<field>"
            raise UserError(f"--set {key}: unknown field; known: {known}")
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
