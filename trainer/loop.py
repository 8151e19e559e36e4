"""`run_train(cfg)`: the training loop, fit for preemptible cluster jobs.

AdamW with warmup + cosine, gradient clipping, gradient accumulation, EMA weights, bf16 autocast on CUDA,
optional torch.compile; JSONL metrics (TensorBoard too when installed) with labelled and action-free
losses apart; DDP under torchrun or srun (`trainer.distributed`: NCCL for gradients, gloo for the loop's
host-side values). SIGUSR1/SIGTERM or a `PREEMPT` file in the run
folder end the step, write a checkpoint and stop cleanly; a non-finite loss stops the run before the
optimizer step, so no checkpoint is ever written from a diverged state.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from featurestore.reader import TokenReader
from pipeline.stage import UserError, atomic_write_json, fault_point
from trainer.checkpoint import BEST_FILE, latest_checkpoint
from trainer.config import TrainConfig
from trainer.data import LABELLED, MIX, STEP
from trainer.distributed import Dist, all_reduce, barrier, broadcast_object, init_distributed
from trainer.objective import compute_loss
from trainer.prefetch import _autocast, _loader, _to
from trainer.run_setup import Trainer, run_folder, setup
from trainer.runlock import RunLock
from trainer.sources import DATA_FILE
from trainer.train_metrics import Metrics
from trainer.validation import EarlyStop, validate

log = logging.getLogger(__name__)

class TrainingDiverged(UserError):
    pass


class Preempted(Exception):
    def __init__(self, step: int, ckpt: Path):
        self.step, self.ckpt = step, ckpt
        super().__init__(f"stopped at step {step} on request; checkpoint {ckpt}; continue with --resume")


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None
    metrics: list[dict[str, Any]]


class StopFlag:
    """Set by SIGUSR1/SIGTERM (SLURM preemption, torchrun stop) or a PREEMPT file in the run folder."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.signalled = run_dir, False
        self._old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: finishing the step, then checkpoint and stop", signum)
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or (self.run_dir / "PREEMPT").exists()

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train_step(tr: Trainer, micro_batches: list[dict[str, Any]], step: int) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches. Raises TrainingDiverged before stepping on NaN/inf."""
    cfg, d = tr.cfg, tr.d
    lr = cfg.lr_at(step - 1) * tr.lr_scale
    for g in tr.optimizer.param_groups:
        g["lr"] = lr
    core = tr.core
    sums = torch.zeros(6, dtype=torch.float64)  # loss, flow, boot, labelled sum, labelled n, free sum
    n_free = 0.0
    for m, batch in enumerate(micro_batches):
        batch = _to(batch, tr.device)
        sync = m == len(micro_batches) - 1 or d.world == 1
        ctx = tr.model.no_sync() if (not sync and hasattr(tr.model, "no_sync")) else nullcontext()
        with ctx, _autocast(cfg, tr.device):
            loss, aux = compute_loss(tr.model, batch, cfg, step, core=core)
            (loss / len(micro_batches)).backward()
        per, lab = aux["per_sample"].float().cpu(), batch[LABELLED].cpu()
        sums += torch.tensor([float(aux["loss"]), float(aux.get("loss_flow", aux["loss"])),
                              float(aux.get("loss_boot", 0.0)), float(per[lab].sum()), float(lab.sum()),
                              float(per[~lab].sum())], dtype=torch.float64)
        n_free += float((~lab).sum())
    finite = torch.tensor([1.0 if math.isfinite(float(sums[0])) else 0.0])
    all_reduce(finite, d, "min")
    if finite.item() < 1:
        raise TrainingDiverged(
            f"non-finite loss at step {step} (loss terms {sums[:3].tolist()}); the optimizer did not step and no "
            "checkpoint was written. Lower the learning rate (--set lr=...), check the store's tokens, then "
            "--resume from the last good checkpoint")
    grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        for pe, pm in zip(tr.ema.parameters(), core.parameters()):
            pe.lerp_(pm.detach(), 1 - decay)
    stats = torch.cat([sums, torch.tensor([n_free], dtype=torch.float64)])
    all_reduce(stats, d)
    k = len(micro_batches) * d.world
    row = {"step": step, "loss": stats[0].item() / k, "loss_flow": stats[1].item() / k,
           "loss_boot": stats[2].item() / k, "lr": lr, "grad_norm": float(grad_norm)}
    if stats[4] > 0:
        row["loss_labelled"] = stats[3].item() / stats[4].item()
    if stats[6] > 0:
        row["loss_action_free"] = stats[5].item() / stats[6].item()
    row.update({f"mix_{src}": share for src, share in micro_batches[0].get(MIX, {}).items()})
    return row


def run_train(cfg: TrainConfig, *, resume: bool = False,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or continue) a run. Raises Preempted after a requested stop (checkpoint written). The run folder is
    owned by this process while it trains (`RunLock`, rank 0's): a second one is refused."""
    d = init_distributed(cfg.device)
    run_dir = run_folder(cfg, resume=resume, d=d)
    lock = _lock(run_dir, d)
    done = False
    try:
        result = _train(cfg, run_dir, resume=resume, on_step=on_step, d=d, lock=lock)
        done = True
        return result
    except Preempted:
        done = True
        raise
    finally:
        if lock is not None:
            lock.release(failed=not done)


def _lock(run_dir: Path, d: Dist) -> RunLock | None:
    """Rank 0 takes the run folder's lock; a refusal is raised on every rank."""
    lock, refused = None, None
    if d.main:
        try:
            lock = RunLock.acquire(run_dir)
        except UserError as e:
            refused = str(e)
    refused = broadcast_object(refused, d)
    if refused is not None:
        raise UserError(refused)
    return lock


def _start(tr: Trainer, reader: TokenReader, resume: bool, start: int):
    """After every check passed: the first batch read, metrics.jsonl trimmed to the checkpoint; only then config.json
    (the config with what the run derived, `trainer.derive`) and data.json written (rank 0). Returns the config, the
    batches and the metrics."""
    cfg, d = tr.cfg, tr.d
    batches = _loader(reader, tr, start + 1)
    if start < cfg.steps:  # the data reads before anything is written
        batches = itertools.chain([next(batches)], batches)
    metrics = Metrics(tr.run_dir, start, d.main, cfg)
    if d.main:
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(tr.run_dir / DATA_FILE, tr.data)
        atomic_write_json(tr.run_dir / "config.json", cfg)
        (tr.run_dir / "PREEMPT").unlink(missing_ok=True)
    barrier(d)
    return cfg, batches, metrics


def _train(cfg: TrainConfig, run_dir: Path, *, resume: bool, on_step: Callable[[dict[str, Any]], None] | None,
           d: Dist, lock: RunLock | None) -> TrainResult:
    tr, start, reader = setup(cfg, resume=resume, d=d, run_dir=run_dir)
    cfg, batches, metrics = _start(tr, reader, resume, start)
    early = EarlyStop(cfg, tr.run_dir, metrics.earlier)
    stop = StopFlag(tr.run_dir)
    last_ckpt = latest_checkpoint(tr.run_dir)
    step = start
    tokens_per_step = cfg.batch_size * cfg.grad_accum * d.world * tr.shape.tokens
    try:
        while step < cfg.steps:
            step += 1
            t0 = time.perf_counter()
            micro = next(batches)
            assert micro[0][STEP] == step, (micro[0][STEP], step)
            t_data = time.perf_counter() - t0
            T = micro[0]["z"].shape[1]
            row = train_step(tr, micro, step)
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row.update(step_time=dt, data_wait=t_data, tokens_per_s=tokens_per_step * T / dt, context=T)
            new_best = False
            if step % cfg.eval_every == 0 or step == cfg.steps:
                if d.main:
                    row.update(validate(tr, reader, step))
                    if early.patience and early.metric in row:
                        new_best = early.seen(float(row[early.metric]))
            metrics.write(row)
            if lock is not None:
                lock.heartbeat()
            fault_point("train-step")
            if on_step:
                on_step(row)
            # 1: stop on request (checkpoint, exit 3); 2: early stopping (done); 0.5: a new best to save
            flag = 1.0 if stop.requested() else 2.0 if d.main and early.exhausted else 0.5 if new_best else 0.0
            want_stop = torch.tensor([flag])
            all_reduce(want_stop, d, "max")
            if step % cfg.ckpt_every == 0 or step == cfg.steps or want_stop.item() > 0:
                if d.main:
                    last_ckpt = tr.save(step)
                    if new_best:
                        early.record(step, last_ckpt)
                barrier(d)
                if not d.main:
                    last_ckpt = tr.run_dir / "checkpoints" / f"step-{step:08d}"  # rank 0's, written by now
            if want_stop.item() == 2.0:
                log.info("early stopping at step %d: no better %s in %d evals (best %.5g, %s)", step, early.metric,
                         early.patience, early.best, tr.run_dir / BEST_FILE)
                break
            if want_stop.item() == 1.0 and step < cfg.steps:
                raise Preempted(step, last_ckpt)
        if d.main:
            atomic_write_json(tr.run_dir / "DONE", {"step": step, "checkpoint": str(last_ckpt),
                                                    **({"early_stopped": step < cfg.steps} if early.patience else {})})
    finally:
        stop.restore()
        metrics.close()
    return TrainResult(tr.run_dir, step, last_ckpt, metrics.rows)
