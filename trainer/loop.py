"""`run_train(cfg)`: the training loop, fit for preemptible cluster jobs.

AdamW with warmup + cosine, gradient clipping, gradient accumulation, EMA weights, bf16 autocast on CUDA,
optional torch.compile; JSONL metrics (TensorBoard too when installed) with labelled and action-free
losses apart; DDP under torchrun or srun (`trainer.distributed`: NCCL for gradients, gloo for the loop's
host-side values). SIGUSR1/SIGTERM or a `PREEMPT` file in the run
folder end the step, write a checkpoint and stop cleanly; a non-finite loss stops the run before the
optimizer step, so no checkpoint is ever written from a diverged state.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import queue
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from featurestore.encoders import check_same_encoder
from featurestore.reader import TokenReader
from pipeline.stage import (
    ConfigMismatchError,
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    fault_point,
    read_json,
    to_jsonable,
)
from trainer.checkpoint import BEST_FILE, latest_checkpoint, load_optimizer, load_weights, save_checkpoint
from trainer.config import TrainConfig, learned_differences
from trainer.data import (
    LABELLED,
    MIX,
    SAMPLE_IDS,
    STEP,
    Stats,
    StepBatches,
    WindowSampler,
    collate,
    compute_stats,
)
from trainer.distributed import (
    Dist,
    all_reduce,
    barrier,
    broadcast_object,
    init_distributed,
    rank_device,
    wrap_ddp,
)
from trainer.model import build_model
from trainer.objective import batch_layout, compute_loss, predict_last_frame
from trainer.precision import uses_bf16
from trainer.runlock import RunLock
from trainer.runs import RunState, new_run_dir, read_config_json
from trainer.sources import (
    DATA_FILE,
    check_record,
    pin_episodes,
    record_episodes,
    resolve_mix,
    resolve_rate,
    token_shape,
)
from trainer.tokens import FrameLayout, TokenShape, frame_error
from trainer.tracking import open_tracker

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


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg.precision, device) else nullcontext()


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
    cfg = resolve_rate(cfg, reader)  # the frameskip shapes the model and its statistics: first
    torch.manual_seed(cfg.seed)
    lr_scale, start_step = 1.0, 0
    if state is not None:
        _check_resume_config(state.saved_config, cfg)
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


def _loader(reader: TokenReader, tr: Trainer, start: int):
    """This rank's micro-batches of steps start, start+1, ...; on CUDA in pinned memory, already on their way to
    the device (`DevicePrefetch`), so the step does not wait for the host."""
    ds = StepBatches(reader, tr.cfg, tr.stats, tr.shape, start_step=start, rank=tr.d.rank, world=tr.d.world)
    cuda = tr.device.type == "cuda"
    if tr.cfg.num_workers == 0:
        batches = ThreadPrefetch(iter(ds)) if cuda else iter(ds)
    else:
        batches = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=tr.cfg.num_workers,
                                                   multiprocessing_context="forkserver", persistent_workers=True,
                                                   prefetch_factor=4, pin_memory=cuda))
    return DevicePrefetch(batches, tr.device) if cuda else batches


class ThreadPrefetch:
    """Reads the next steps' batches in a background thread (no DataLoader workers): the host reads the store
    while the device computes."""

    def __init__(self, batches, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._fill, args=(batches,), daemon=True, name="batch-prefetch")
        self.thread.start()

    def _fill(self, batches) -> None:
        try:
            for b in batches:
                self.q.put(b)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            self.q.put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item


class DevicePrefetch:
    """Keeps the next step's micro-batches copying to the device (pinned memory, a side stream) while the
    current step computes: `next()` hands over batches that are already there."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = batches, device
        self.stream = torch.cuda.Stream(device)
        self.next = self._load()

    def _load(self) -> list[dict[str, Any]]:
        micro = next(self.batches)
        with torch.cuda.stream(self.stream):
            return [_to(b, self.device, pin=True) for b in micro]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, Any]]:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        out = self.next
        for b in out:  # the tensors were made on the side stream: tell the allocator the main stream uses them
            for v in b.values():
                if torch.is_tensor(v) and v.device.type == "cuda":
                    v.record_stream(torch.cuda.current_stream(self.device))
        self.next = self._load()
        return out


def _to(batch: dict[str, Any], device: torch.device, pin: bool = False) -> dict[str, Any]:
    def move(k, v):
        if not torch.is_tensor(v) or k == SAMPLE_IDS:
            return v
        if pin and not v.is_pinned():
            v = v.pin_memory()
        return v.to(device, non_blocking=True)

    return {k: move(k, v) for k, v in batch.items()}


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
    """After every check passed: the mix resolved, the first batch read, metrics.jsonl trimmed to the checkpoint;
    only then config.json and data.json written (rank 0). Returns the config, the batches and the metrics."""
    cfg, d = tr.cfg, tr.d
    if resume and not cfg.mix_weights and (tr.run_dir / "config.json").is_file() and d.main:
        saved = read_config_json(tr.run_dir).get("mix_weights", [])
        cfg = dataclasses.replace(cfg, mix_weights=tuple(tuple(x) for x in saved))
    cfg = broadcast_object(cfg, d)
    cfg = tr.cfg = resolve_mix(cfg, reader)
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
