"""Experiment tracking: where researchers watch runs (TensorBoard by default, W&B or trackio on request).

`metrics.jsonl` in the run folder stays the source of truth (resume trims it, tools read it); a tracker mirrors
the same rows. TensorBoard event files go to `<run>/tensorboard/` (`tensorboard --logdir runs/` compares every
run side by side); W&B and trackio are optional extras (`pip install 'wmctl[wandb]'`, `'wmctl[trackio]'`),
imported only when chosen, and keep their own offline switches (`WANDB_MODE=offline`; trackio logs locally).

Every figure is logged at a training step: training's rows at theirs, eval's at the step of the checkpoint it
evaluated (the horizon is in the tag), so evals of successive checkpoints form curves beside the training ones.
W&B's x axis is that step logged as a metric (`STEP_METRIC`), not its own row counter: an eval of an earlier
checkpoint, logged after training went further, is kept (rows with a smaller `step=` are dropped by W&B).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.stage import UserError

log = logging.getLogger(__name__)

TRACKERS = ("none", "tensorboard", "wandb", "trackio")


class Tracker:
    """No tracking (`none`); the base of the others: scalars at a step, PNG images, close."""

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        pass

    def image(self, tag: str, png: Path, step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is a dependency; a broken install still gets a clear word
            raise UserError(f"--tracker tensorboard needs the tensorboard package ({e}); pip install tensorboard, "
                            "or pass --tracker none") from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.writer.add_scalar(prefix + k, v, step)

    def image(self, tag: str, png: Path, step: int = 0) -> None:
        import matplotlib.image

        img = matplotlib.image.imread(str(png))[..., :3]  # HWC float in [0, 1]
        self.writer.add_image(tag, img, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


STEP_METRIC = "global_step"  # W&B's x axis: the training step, logged with every row


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], *, project: str = "wmctl",
                 entity: str | None = None, tags: tuple[str, ...] = ()):
        wandb = _optional("wandb")
        # one W&B run per wmctl run: a resumed job (and the run's evals) continue it; WANDB_MODE=offline is honoured
        # by wandb itself
        self.run = wandb.init(project=project, entity=entity, tags=list(tags) or None, name=name,
                              id=_run_id(run_dir), resume="allow", dir=str(run_dir), config=config)
        self.run.define_metric(STEP_METRIC)
        for prefix in ("train/*", "eval/*"):
            self.run.define_metric(prefix, step_metric=STEP_METRIC)
        self._wandb = wandb

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        self.run.log({**{prefix + k: v for k, v in values.items()}, STEP_METRIC: step})

    def image(self, tag: str, png: Path, step: int = 0) -> None:
        self.run.log({tag: self._wandb.Image(str(png)), STEP_METRIC: step})

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(Tracker):
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        self.trackio = _optional("trackio")
        self.trackio.init(project="wmctl", name=name, config=config, resume="allow")

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        self.trackio.log({prefix + k: v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _optional(package: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"--tracker {package} needs the optional extra: pip install 'wmctl[{package}]' (or pass "
                        "--tracker tensorboard, the default, or none)") from None


def _run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


def open_tracker(kind: str, run_dir: Path, *, name: str | None = None, config: dict[str, Any] | None = None,
                 project: str = "wmctl", entity: str | None = None, tags: tuple[str, ...] = ()) -> Tracker:
    """The tracker `kind` for the run in `run_dir` (rank 0 only: callers on other ranks pass `none`); `project`,
    `entity`, `tags`: the W&B run's (the run config's `wandb_project`, `wandb_entity`, `wandb_tags`)."""
    if kind not in TRACKERS:
        raise UserError(f"--tracker {kind!r}: choose one of {', '.join(TRACKERS)}")
    name = name or run_dir.name
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir)
    if kind == "wandb":
        return WandbTracker(run_dir, name, config or {}, project=project, entity=entity, tags=tags)
    if kind == "trackio":
        return TrackioTracker(run_dir, name, config or {})
    return Tracker()
