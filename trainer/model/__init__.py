"""The world models (architecture only): the shortcut-forcing dynamics (also the backbone of the deterministic
control) and the teacher-forced baseline."""

from __future__ import annotations

import torch.nn as nn

from trainer.config import ModelConfig
from trainer.model.baseline import TeacherForcedPredictor
from trainer.model.dynamics import ShortcutDynamics
from trainer.tokens import TokenShape


def build_model(cfg: ModelConfig, shape: TokenShape) -> nn.Module:
    if cfg.kind in ("shortcut", "deterministic"):
        return ShortcutDynamics(cfg, shape)
    return TeacherForcedPredictor(cfg, shape)
