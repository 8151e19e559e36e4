"""Validation during training: the val loss and the EMA's one-step prediction against copy-last (`validate`), and
early stopping on it (`EarlyStop`, the best checkpoint recorded in <run>/best.json)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from featurestore.reader import TokenReader
from pipeline.stage import UserError, atomic_write_json
from trainer.checkpoint import BEST_FILE
from trainer.config import TrainConfig
from trainer.data import WindowSampler, collate
from trainer.objective import batch_layout, compute_loss, predict_last_frame
from trainer.prefetch import _autocast, _to
from trainer.run_setup import Trainer
from trainer.tokens import FrameLayout, TokenShape, frame_error


class EarlyStop:
    """Early stopping on a val metric (`early_stop_patience` evals without a new best): the best checkpoint is saved
    when it is found and recorded in <run>/best.json, which `resolve_checkpoint` then names for the run. On resume
    the count continues from the metrics the run logged before."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, earlier: list[dict[str, Any]]):
        self.patience, self.metric, self.run_dir = cfg.early_stop_patience, cfg.early_stop_metric, run_dir
        self.best, self.since = float("inf"), 0
        for row in earlier:
            if self.metric in row:
                self.seen(float(row[self.metric]))

    def seen(self, value: float) -> bool:
        """Count one eval; True when it is a new best."""
        if value < self.best:
            self.best, self.since = value, 0
            return True
        self.since += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def record(self, step: int, ckpt: Path) -> None:
        atomic_write_json(self.run_dir / BEST_FILE, {"checkpoint": ckpt.name, "step": step, "metric": self.metric,
                                                     "value": self.best})


@torch.no_grad()
def validate(tr: Trainer, reader: TokenReader, step: int) -> dict[str, float]:
    """Val loss (training objective, fixed windows and noise) and EMA one-step prediction vs copy-last
    (patch tokens; with proprioception also the state)."""
    cfg = tr.cfg
    try:
        sampler = WindowSampler(reader, dataclasses.replace(cfg, seed=cfg.seed + 10_007), split="val")
    except UserError:
        return {}
    T = cfg.context_frames
    samples = sampler.global_batch(0, cfg.val_windows, T)
    core = tr.core
    out = {"val_loss": 0.0, "val_pred_mse": 0.0, "val_copy_mse": 0.0}
    n = 0
    core.eval()
    for i in range(0, len(samples), cfg.batch_size):
        chunk = samples[i:i + cfg.batch_size]
        batch = _to(collate(reader, chunk, T, cfg, tr.stats, tr.shape), tr.device)
        with _autocast(cfg, tr.device):
            loss, _ = compute_loss(core, batch, cfg, step)
            pred = predict_last_frame(tr.ema, batch, cfg, generator=torch.Generator().manual_seed(cfg.seed + i))
        layout = batch_layout(batch)  # errors over the cameras and state channels each window's robot has
        last = batch["z"][:, -1].float()
        pred_d, copy_d = pred.float() - last, batch["z"][:, -2].float() - last
        out["val_loss"] += float(loss) * len(chunk)
        out["val_pred_mse"] += _frame_mse(pred_d, tr.shape, layout) * len(chunk)
        out["val_copy_mse"] += _frame_mse(copy_d, tr.shape, layout) * len(chunk)
        if tr.shape.state_dim:  # normalised state: predicted vs copied from the frame before
            out["val_state_pred_mse"] = out.get("val_state_pred_mse", 0.0) + \
                _frame_mse(pred_d, tr.shape, layout, state=True) * len(chunk)
            out["val_state_copy_mse"] = out.get("val_state_copy_mse", 0.0) + \
                _frame_mse(copy_d, tr.shape, layout, state=True) * len(chunk)
        n += len(chunk)
    core.train()
    return {k: v / n for k, v in out.items()}


def _frame_mse(diff_BNZ: torch.Tensor, shape: TokenShape, layout: FrameLayout, *, state: bool = False) -> float:
    """Mean squared error of the patch tokens (over the cameras each sample has) or of the state (over its
    robot's channels)."""
    patches = frame_error(diff_BNZ[:, None], shape, 0.0, layout)
    if not state:
        return float(patches.mean())
    return float((frame_error(diff_BNZ[:, None], shape, 1.0, layout) - patches).mean())
