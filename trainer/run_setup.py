"""What the training loop starts from: the run folder, and the model, EMA and optimizer built or restored from the
run's newest checkpoint (`setup`), every check done before anything is written (`trainer.loop`)."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from featurestore.encoders import check_same_encoder
from featurestore.reader import TokenReader
from pipeline.stage import ConfigMismatchError, UserError, read_json, to_jsonable
from trainer.checkpoint import latest_checkpoint, load_optimizer, load_weights, save_checkpoint
from trainer.config import TrainConfig, learned_differences
from trainer.data import Stats, compute_stats
from trainer.derive import derive
from trainer.distributed import Dist, broadcast_object, rank_device, wrap_ddp
from trainer.model import build_model
from trainer.runs import RunState, new_run_dir, read_config_json
from trainer.sources import DATA_FILE, check_record, pin_episodes, record_episodes, token_shape
from trainer.tokens import TokenShape

log = logging.getLogger("trainer.loop")  # the training loop's logger, as before these parts had a module of their own


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    diffs = learned_differences(saved, to_jsonable(cfg))
    if diffs:
        raise ConfigMismatchError("the run being resumed", diffs, "Resume with the same config, or start a new --out.")


@dataclasses.dataclass
class Trainer:
    """The state the loop updates (model, EMA, optimizer) and how it writes it."""

    cfg: TrainConfig
    run_dir: Path
    shape: TokenShape
    stats: Stats
    model: nn.Module  # what the step calls: possibly DDP- and/or compile-wrapped
    core: nn.Module  # the bare module (its parameters, its state dict)
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    d: Dist
    encoder: dict[str, Any]
    lr_scale: float = 1.0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # the run's episodes (`trainer.sources`)

    def state(self, step: int) -> dict[str, Any]:
        return {"config": to_jsonable(self.cfg), "encoder": self.encoder, "store": str(Path(self.cfg.store).resolve()),
                "token_shape": dataclasses.asdict(self.shape), "stats": self.stats.to_dict(),
                "data_cursor": {"next_step": step + 1, "world_size": self.d.world, "batch_size": self.cfg.batch_size,
                                "grad_accum": self.cfg.grad_accum}, "lr_scale": self.lr_scale, "data": self.data}

    def save(self, step: int) -> Path:
        return save_checkpoint(self.run_dir, step, model=self.core.state_dict(), ema=self.ema.state_dict(),
                               optimizer=self.optimizer.state_dict(), state=self.state(step),
                               keep_last=self.cfg.keep_last)


def run_folder(cfg: TrainConfig, *, resume: bool, d: Dist) -> Path:
    """The run folder: --out, else a new one under runs/ (rank 0 names it)."""
    if cfg.out is not None:
        return Path(cfg.out)
    if resume:
        raise UserError("--resume needs --out RUN (the run folder to continue)")
    return Path(broadcast_object(new_run_dir(cfg.model.kind) if d.main else None, d))


def _restore_point(run_dir: Path, resume: bool) -> RunState | None:
    """The newest complete checkpoint of the run, read and checked (None: a fresh start)."""
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if ckpt is not None and not resume:
        raise UserError(f"{run_dir} already has checkpoints (newest {ckpt.name}); pass --resume to continue it, "
                        "or choose another --out")
    if resume and ckpt is None:
        log.info("--resume: %s has no complete checkpoint yet; starting from scratch", run_dir)
    return RunState.read(ckpt) if ckpt is not None else None


def _run_episodes(reader: TokenReader, cfg: TrainConfig, run_dir: Path, state: RunState | None, resume: bool,
                  d: Dist) -> dict[str, Any]:
    """The episodes the run trains on: a resumed run's record (its checkpoint's, else the data.json written at its
    start), to which `reader` is then pinned; else recorded now from the store."""
    record, where = None, None
    if d.main and state is not None and state.data is not None:
        record, where = state.data, state.checkpoint / "state.json"
    elif d.main and resume and (run_dir / DATA_FILE).is_file():
        where = run_dir / DATA_FILE
        try:
            record = read_json(where)
        except (OSError, ValueError) as e:
            raise UserError(f"{where} cannot be read ({type(e).__name__}); restore it, or start a new --out") from None
    elif d.main and state is not None:
        log.warning("%s: this run records no episodes (made before runs did): it goes on with the store's episodes "
                    "now, recorded from here on", run_dir)
    if d.main and record is not None:
        record = check_record(record, where)
    record, where = broadcast_object((record, str(where)) if d.main else None, d)
    if record is not None:
        pin_episodes(reader, cfg, record, where)
        return record
    return broadcast_object(record_episodes(reader, cfg) if d.main else None, d)


def _saved_mix(cfg: TrainConfig, run_dir: Path, resume: bool, d: Dist) -> tuple[tuple[str, float], ...]:
    """A resumed run's recorded mix weights (its config.json's), which it keeps unless the command gives its own."""
    saved = ()
    if resume and not cfg.mix_weights and (run_dir / "config.json").is_file() and d.main:
        saved = tuple(tuple(x) for x in read_config_json(run_dir).get("mix_weights", []))
    return broadcast_object(saved, d)


def setup(cfg: TrainConfig, *, resume: bool, d: Dist, run_dir: Path | None = None
          ) -> tuple[Trainer, int, TokenReader]:
    """Build (or restore) everything the loop needs. Returns the trainer, the last finished step, the reader.
    Writes nothing: every check (config, encoder, the run's episodes) is done here."""
    device = rank_device(cfg.device, d)
    reader = TokenReader(cfg.store)
    run_dir = Path(run_dir) if run_dir is not None else run_folder(cfg, resume=resume, d=d)
    state = _restore_point(run_dir, resume)
    if state is not None:
        check_same_encoder(state.encoder, reader.encoder, what=f"checkpoint {state.checkpoint}",
                           fix="train on a store made with the encoder the checkpoint was trained on")
    data = _run_episodes(reader, cfg, run_dir, state, resume, d)  # pins a resumed run's episodes: before all else
    derived = derive(cfg, reader, saved_mix=_saved_mix(cfg, run_dir, resume, d))  # the frameskip shapes the model
    given, cfg = cfg, derived.recorded(cfg)  # and its statistics: first
    torch.manual_seed(cfg.seed)
    lr_scale, start_step = 1.0, 0
    if state is not None:
        _check_resume_config(state.saved_config, derived.rated(given))
        shape, stats, lr_scale, start_step = state.shape, state.stats, state.lr_scale, state.step
    else:
        shape = token_shape(reader, cfg)
        stats = broadcast_object(compute_stats(reader, cfg, shape) if d.main else None, d)
    model = build_model(cfg.model, shape).to(device)
    if hasattr(model, "delta_var"):
        model.delta_var.fill_(float(stats.frame_delta_var[0]))
    if cfg.init_from is not None and state is None:
        src = RunState.read(cfg.init_from)
        check_same_encoder(src.encoder, reader.encoder, what=f"--init-from {src.checkpoint}",
                           fix="fine-tune on a store made with the encoder that run was trained on")
        model.load_state_dict(load_weights(src.checkpoint, "ema"))
        stats, lr_scale = src.stats, cfg.finetune_lr_scale
        log.info("fine-tuning from %s (EMA weights) at %.2g x lr", src.checkpoint, lr_scale)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr * lr_scale, betas=cfg.betas,
                                  fused=False)
    if state is not None:
        model.load_state_dict(load_weights(state.checkpoint, "model"))
        ema.load_state_dict(load_weights(state.checkpoint, "ema"))
        optimizer.load_state_dict(load_optimizer(state.checkpoint)["optimizer"])
        log.info("resuming %s from %s (step %d)", run_dir, state.checkpoint.name, start_step)
    wrapped = wrap_ddp(model, device, d)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    trainer = Trainer(cfg, run_dir, shape, stats, wrapped, model, ema, optimizer, device, d, reader.encoder, lr_scale,
                      data=data)
    return trainer, start_step, reader
