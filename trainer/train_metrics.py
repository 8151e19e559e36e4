"""A run's metrics.jsonl (rank 0's; on resume the lines after the checkpoint are dropped), mirrored to its tracker."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.stage import UserError, atomic_write_bytes, to_jsonable
from trainer.config import TrainConfig
from trainer.tracking import open_tracker

log = logging.getLogger("trainer.loop")  # the training loop's logger, as before this part had a module of its own


class Metrics:
    """metrics.jsonl (rank 0; on resume lines after the checkpoint are dropped), mirrored to the run's tracker
    (`trainer.tracking`: TensorBoard by default)."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, cfg: TrainConfig):
        self.path, self.enabled, self.rows = run_dir / "metrics.jsonl", enabled, []
        self.earlier: list[dict[str, Any]] = []
        self.tracker = open_tracker(cfg.tracker if enabled else "none", run_dir, config=to_jsonable(cfg),
                                    project=cfg.wandb_project, entity=cfg.wandb_entity, tags=cfg.wandb_tags)
        if not enabled:
            return
        if self.path.exists():
            kept = _metrics_until(self.path, start_step)
            atomic_write_bytes(self.path, ("\n".join(kept) + ("\n" if kept else "")).encode())
            self.earlier = [json.loads(line) for line in kept]  # what the run logged before this resume

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.scalars({k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                             row["step"], prefix="train/")

    def close(self) -> None:
        self.tracker.close()


def _metrics_until(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl up to `step` (a resumed run writes the later ones again). A torn last line (a
    kill in the middle of a write) is dropped, and the log says so; a damaged line before it is refused."""
    lines = path.read_bytes().split(b"\n")
    kept: list[str] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            row_step = row["step"] if isinstance(row, dict) else None
        except (ValueError, KeyError):
            row_step = None
        if row_step is None and not any(x.strip() for x in lines[i + 1:]):
            log.warning("%s: dropped a torn last line (%d bytes, a write cut off by a kill)", path, len(raw))
            break
        if not isinstance(row_step, int) or isinstance(row_step, bool):
            raise UserError(f"{path}: line {i + 1} is not a metrics row with an integer step ({raw[:60]!r}); remove "
                            "that line (it holds no checkpointed state) and resume again")
        if row_step <= step:
            kept.append(raw.decode())
    return kept
