"""The run folder: where training, eval, planning and the decoder write, and a trained run read back once.

```
runs/<YYYYmmdd-HHMMSS>-<kind>/        one training run (`wmctl train`; or the folder given with --out)
  config.json  metrics.jsonl  tensorboard/  PREEMPT (a stop request)  DONE
  checkpoints/step-XXXXXXXX/          model, EMA, optimizer, state.json (trainer.checkpoint)
  eval/                               `wmctl eval` (eval.json, plots, rollout grids)
  plan/offline_<planner>.json         `wmctl plan offline`
  plan/sim_<planner>_<shift>/         `wmctl plan sim` (sim.json with every trial, PNG strips; sim-<time>.json:
                                      an earlier result of another configuration, kept)
runs/<YYYYmmdd-HHMMSS>-decoder/       `wmctl decoder train`
```

A run's checkpoint `state.json` is the one answer to "what was this run trained on": its config, its store
(an absolute path), the encoder identity, the token layout and the normalisation statistics (`RunState`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from pipeline.stage import UserError, to_jsonable
from trainer.checkpoint import latest_checkpoint, load_state, resolve_checkpoint
from trainer.config import TrainConfig, config_from_dict, learned_differences
from trainer.data import Stats
from trainer.tokens import TokenShape

RUNS = Path("runs")
DECODER_META = "decoder.json"


def _new_dir(kind: str, base: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{stamp}-{kind}"
    i = 1
    while path.exists():
        path = base / f"{stamp}-{kind}-{i}"
        i += 1
    return path


def new_run_dir(kind: str, base: Path = RUNS) -> Path:
    """A fresh `runs/<time>-<kind>` folder name for a training run (not created)."""
    return _new_dir(kind, base)


def new_decoder_dir(base: Path = RUNS) -> Path:
    return _new_dir("decoder", base)


def newest_run(base: Path = RUNS) -> Path:
    """The most recently updated run folder that has a complete checkpoint."""
    candidates = [p for p in Path(base).glob("*") if p.is_dir() and latest_checkpoint(p) is not None]
    if not candidates:
        raise UserError(f"no trained run under {base}/ (train one with `wmctl train`, or pass --run/--ckpt)")
    return max(candidates, key=lambda p: latest_checkpoint(p).stat().st_mtime)


def newest_decoder(base: Path = RUNS) -> Path:
    found = sorted((p for p in Path(base).glob("*") if (p / DECODER_META).is_file()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no decoder under {base}/ (train one with `wmctl decoder train`, or pass --decoder)")
    return found[-1]


def resolve_run(run: Path | None, ckpt: Path | None) -> Path:
    """`--run` or `--ckpt` as given, else the newest run under runs/."""
    if run and ckpt:
        raise UserError("give --run or --ckpt, not both")
    return ckpt or run or newest_run()


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint folder (`<run>/checkpoints/step-*`)."""
    return Path(checkpoint).parent.parent


def eval_dir(checkpoint: Path) -> Path:
    return run_dir_of(checkpoint) / "eval"


def plan_dir(checkpoint: Path) -> Path:
    return run_dir_of(checkpoint) / "plan"


@dataclasses.dataclass(frozen=True)
class RunState:
    """What a checkpoint says about its run, read once from its state.json."""

    checkpoint: Path
    config: TrainConfig
    saved_config: dict[str, Any]  # as written (for the resume check, which names fields that differ)
    encoder: dict[str, Any]
    store: Path
    shape: TokenShape
    stats: Stats
    step: int
    lr_scale: float

    @classmethod
    def read(cls, path: Path) -> RunState:
        """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
        ckpt = resolve_checkpoint(path)
        s = load_state(ckpt)
        shape = TokenShape.from_dict(s["token_shape"])
        return cls(ckpt, config_from_dict(s["config"]), s["config"], s["encoder"], Path(s["store"]).resolve(), shape,
                   Stats.from_dict(s["stats"]), int(s["step"]), float(s.get("lr_scale", 1.0)))

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.checkpoint)

    @property
    def name(self) -> str:
        return f"{self.run_dir.name}/{self.checkpoint.name}"


def saved_config(run_dir: Path) -> TrainConfig | None:
    """The config a run folder was trained with (its newest checkpoint's, else the config.json written at its
    start), or None for a folder that holds no run."""
    run_dir = Path(run_dir)
    if latest_checkpoint(run_dir) is not None:
        run = RunState.read(run_dir)
        return dataclasses.replace(run.config, store=run.store)
    if (run_dir / "config.json").is_file():
        import json

        return config_from_dict(json.loads((run_dir / "config.json").read_text()))
    return None


def finished_as(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether `run_dir` holds a run that finished (DONE) training `cfg`: the same steps and nothing learned
    differently (`learned_differences`; store, output folder and bookkeeping may differ). Studies reuse such a
    run instead of training it again."""
    if not (Path(run_dir) / "DONE").is_file():
        return False
    saved = saved_config(run_dir)
    return saved is not None and saved.steps == cfg.steps and \
        not learned_differences(to_jsonable(saved), to_jsonable(cfg))
