"""`EvalConfig`: what `wmctl eval` evaluates (which checkpoint, store, horizons, windows, samples, baselines) and
where it writes; `CONDITIONS`, the three conditions a model is scored under."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.stage import UserError

CONDITIONS = ("actions", "null_action", "action_free")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    ckpt: Path  # a run folder or a checkpoint folder
    store: Path | None = None  # default: the store the run was trained on
    horizons: tuple[int, ...] = (1, 5, 10, 20)
    split: str = "val"
    episodes: int | None = None  # at most this many episodes per condition
    windows_per_episode: int = 4
    context: int | None = None  # context frames (default: half the model's window)
    k: int = 4
    samples: int = 4  # samples per window for a sampler (deterministic models: 1)
    moving_fraction: float = 0.1  # "moving" tokens: this top fraction by true change over the horizon
    k_sweep: tuple[int, ...] | None = None  # default: powers of two up to min(16, k_max)
    weights: str = "ema"
    baselines: tuple[Path, ...] = ()
    probe: bool = True
    probe_frames: int = 2000  # frames the scene probe samples (its kernel is this squared)
    action_effect: bool = True  # how far the actions move each model's prediction against the true change
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    out: Path | None = None  # default: <run>/eval; given, everything eval writes goes there (its tracker's too)
    plots: bool = True
    decoder: Path | None = None  # a visualisation decoder: also write `rollouts` side-by-side PNG grids
    rollouts: int = 3
    tracker: str = "tensorboard"  # also show the figures where the run's training curves are (trainer.tracking)

    def __post_init__(self) -> None:
        if not self.horizons or min(self.horizons) < 1:
            raise UserError("--horizons must be positive integers, e.g. 1,5,10,20")
        if self.weights not in ("ema", "model"):
            raise UserError("weights must be ema or model")
        if self.samples < 1:
            raise UserError("--samples must be >= 1")
        if not 0 < self.moving_fraction <= 1:
            raise UserError("--moving-fraction must be in (0, 1]")
