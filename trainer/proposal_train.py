"""Training the amortized proposal (`trainer.proposal`) on a run's labelled windows, and its own score.

The windows are the run's: the same store episodes (pinned to those the run recorded, `trainer.sources.
pin_episodes`), the same train/val split (`trainer.data.select_episodes`), drawn by the training's own window
sampler (`trainer.data.WindowSampler`, a pure function of (seed, step): labelled windows only) and read by its
`load_sample` (normalised latents in the model's full camera layout, normalised per-frame actions, their
validity). A window of 1 + max(horizon, goals) model frames gives the current frame (its first), a goal `g`
frames later (g drawn uniformly in 1..goals per window) and the target: the recorded actions of the `horizon`
frames after the current one. The loss is their mean squared error in normalised units over the valid frames.
Its progress is kept every few hundred steps (`Partial`): a training stopped midway continues from there.

The score (`evaluate`): on held-out (val) windows, the mean squared error of the proposed actions against the
recorded ones in units of the training actions' std, per window over its valid frames, then over windows: the
units of `plan offline`'s `action_error_vs_ground_truth` (the mean action scores 1 where the val actions are
distributed like the training ones). Beside it the same error of the mean action, of the zero action (in the
model's raw action space: for state-relative actions, "stay where you are") and of uniformly random actions in
the planning box.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from featurestore.reader import TokenReader, Window
from pipeline.stage import (
    UserError,
    atomic_output,
    atomic_write_json,
    config_differences,
    fault_point,
    file_sha256,
    read_json,
    to_jsonable,
)
from trainer.actions import ActionSpace
from trainer.data import ACTIONS, VALID, WindowSampler, Z, action_space, load_sample, select_episodes
from trainer.proposal import (
    RECORD,
    WEIGHTS,
    ProposalConfig,
    ProposalNet,
    build_net,
    frame_stats,
    model_key,
    proposal_dir,
    read_record,
)
from trainer.runs import RunLock, RunState
from trainer.sources import check_record, pin_episodes

log = logging.getLogger(__name__)

VAL_SEED = 10_007  # the val windows' sampler seed offset (as the training's validation draws them)
PARTIAL, PARTIAL_RECORD = "partial.safetensors", "partial.json"  # a training's progress (`Partial`)


@dataclasses.dataclass(frozen=True)
class ProposalReport:
    """What `train_proposal` did: where the proposal is, whether it trained now (False: the saved one had this
    configuration; nothing to do), and its val score (`action_error`: std units, see the module doc; None where
    the run has no labelled val episode long enough)."""

    folder: Path
    trained: bool
    steps: int
    params: int
    train_loss: float  # the mean loss over the last tenth of the steps
    action_error: dict[str, float] | None
    val_windows: int
    resumed_from: int = 0  # the step a stopped training continued from (0: trained from the start)


class EpisodeReads:
    """`TokenReader.read` served from whole episodes read once, where the episodes of `rows` fit in `budget` bytes
    (a proposal's training draws thousands of windows from the same episodes; `load_sample` reads each window
    through it); otherwise straight from the store."""

    def __init__(self, reader: TokenReader, rows: Any, budget: int = 2 << 30):
        self.reader, self.cached = reader, {}
        frame = reader.read(Window(int(rows.index[0]), 0, 1), ("patch",))["patch"]  # one frame, as float32
        self.enabled = frame.nbytes * int(rows.length.sum()) <= budget

    def read(self, w: Window, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        if not self.enabled:
            return self.reader.read(w, fields)
        out = {}
        for name in fields:
            key = (w.episode, name)
            if key not in self.cached:
                self.cached[key] = self.reader.episode(w.episode, (name,))[name]
            out[name] = self.cached[key][w.start:w.start + (w.length - 1) * w.stride + 1:w.stride]
        return out


@dataclasses.dataclass
class Windows:
    """The proposal's view of a run's labelled windows of one split."""

    reader: TokenReader | EpisodeReads
    sampler: WindowSampler
    run: RunState
    cfg: ProposalConfig

    @property
    def frames(self) -> int:
        """Model frames of one window: the current frame and the farthest goal or the last target action."""
        return 1 + max(self.cfg.horizon, self.cfg.goals)

    def batch(self, step: int, size: int, seed: int) -> dict[str, torch.Tensor]:
        """The windows of `step` (the sampler's draw) with their goal offsets (drawn from (seed, step)): current
        [B, N, Z], goal [B, N, Z], target [B, H, A] (normalised), valid [B, H]."""
        run, H = self.run, self.cfg.horizon
        samples = self.sampler.global_batch(step, size, self.frames)
        goals = np.random.default_rng([seed, step, 1]).integers(1, self.cfg.goals + 1, size=len(samples))
        items = [load_sample(self.reader, s, self.frames, self.sampler.cfg, run.stats, run.shape) for s in samples]
        z = torch.from_numpy(np.stack([it[Z] for it in items]))
        rows = torch.arange(len(items))
        return {"current": z[:, 0], "goal": z[rows, torch.from_numpy(goals)],
                "target": torch.from_numpy(np.stack([it[ACTIONS][1:1 + H] for it in items])),
                "valid": torch.from_numpy(np.stack([it[VALID][1:1 + H] for it in items]))}


def run_windows(run: RunState, reader: TokenReader, cfg: ProposalConfig, split: str) -> Windows:
    """The run's labelled `split` windows long enough for `cfg` (a UserError naming the fix where none is)."""
    tcfg = dataclasses.replace(run.config, labelled_fraction=1.0, action_dropout=0.0, context_schedule=(),
                               seed=cfg.seed + (VAL_SEED if split == "val" else 0),
                               include_augmented=run.config.include_augmented and split == "train")
    T = 1 + max(cfg.horizon, cfg.goals)
    eps = select_episodes(reader, tcfg, split)
    span = (T - 1) * tcfg.frameskips(eps.source) + 1
    if not (eps.has_actions.to_numpy() & (eps.length.to_numpy() >= span)).any():
        raise UserError(f"no labelled {split} episode of {reader.path} has the frames a proposal window of {T} model "
                        f"frames needs (horizon {cfg.horizon}, goals up to {cfg.goals} frames ahead): lower them "
                        "(ProposalConfig.horizon / max_goal)")
    return Windows(EpisodeReads(reader, eps[eps.has_actions]), WindowSampler(reader, tcfg, split), run, cfg)


def masked_error(pred_BHA: torch.Tensor, target_BHA: torch.Tensor, valid_BH: torch.Tensor) -> torch.Tensor:
    """Per window, the mean squared error over its valid frames' actions [B] (NaN for a window with none)."""
    sq = (pred_BHA - target_BHA).pow(2).mean(-1) * valid_BH
    return sq.sum(1) / valid_BH.sum(1)


def _lr(cfg: ProposalConfig, step: int, steps: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclasses.dataclass
class Partial:
    """A training's progress, kept every `every` steps beside the proposal (`partial.safetensors`: the weights and
    the optimizer's state; then `partial.json`: the step, the losses so far, the training's key and the tensors'
    sha256): a training of the same key stopped midway continues from its last save and ends where an uninterrupted
    one does (each step's windows and learning rate are functions of the step alone). `resumed_from`: the step
    the last `load` continued from (0: from the start)."""

    folder: Path
    key: dict[str, Any]
    every: int
    resumed_from: int = 0

    def load(self, net: ProposalNet, opt: torch.optim.Optimizer) -> list[float]:
        """Restore the saved progress of this key into `net` and `opt`: the losses of the steps done ([]: none)."""
        rec = read_json(self.folder / PARTIAL_RECORD) if (self.folder / PARTIAL_RECORD).is_file() else None
        weights = self.folder / PARTIAL
        if not isinstance(rec, dict) or rec.get("key") != self.key or not weights.is_file() or \
                file_sha256(weights) != rec.get("sha256"):
            return []
        tensors = load_file(weights)
        net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        self.resumed_from = int(rec["step"])
        log.info("%s: continuing the proposal's training from step %d", self.folder, self.resumed_from)
        return [float(x) for x in rec["losses"]]

    def save(self, step: int, net: ProposalNet, opt: torch.optim.Optimizer, losses: list[float]) -> None:
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        for i, st in opt.state_dict()["state"].items():
            tensors.update({f"opt.{i}.{name}": v for name, v in st.items()})
        with atomic_output(self.folder / PARTIAL) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        atomic_write_json(self.folder / PARTIAL_RECORD, {"key": self.key, "step": step, "losses": losses,
                                                         "sha256": file_sha256(self.folder / PARTIAL)})
        fault_point("proposal-partial")

    def clear(self) -> None:
        for name in (PARTIAL_RECORD, PARTIAL):
            (self.folder / name).unlink(missing_ok=True)


def fit(net: ProposalNet, data: Windows, steps: int, device: torch.device, partial: Partial | None = None
        ) -> list[float]:
    """`steps` AdamW steps on the masked action error (from where `partial` stopped, saving there every
    `partial.every` steps); the loss of each step."""
    cfg = data.cfg
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = partial.load(net, opt) if partial is not None else []
    net.train()
    for step in range(len(losses), steps):
        b = {k: v.to(device) for k, v in data.batch(step, cfg.batch_size, cfg.seed).items()}
        err = masked_error(net(b["current"], b["goal"]), b["target"], b["valid"].float())
        loss = err[b["valid"].any(1)].mean()
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if partial is not None and partial.every and (step + 1) % partial.every == 0 and step + 1 < steps:
            partial.save(step + 1, net, opt, losses)
    net.eval()
    return losses


@torch.no_grad()
def evaluate(net: ProposalNet, data: Windows, device: torch.device) -> dict[str, float]:
    """The val score (module doc): `proposal`, `mean_action`, `zero_action` and `random` action errors in std units,
    and `windows`, the val windows with a valid action scored."""
    cfg = data.cfg
    b = data.batch(0, cfg.val_windows, cfg.seed + VAL_SEED)
    valid = b["valid"].float()
    keep = b["valid"].any(1)
    target = b["target"]
    actions = _space(data.run)
    zero = torch.as_tensor(actions.normalize_frames(np.zeros(actions.frame_dim)), dtype=torch.float32)
    g = torch.Generator().manual_seed(cfg.seed)
    guesses = {"proposal": net(b["current"].to(device), b["goal"].to(device)).cpu(),
               "mean_action": torch.zeros_like(target), "zero_action": zero.expand_as(target),
               "random": (torch.rand(target.shape, generator=g) - 0.5) * 5}  # uniform in mean +- 2.5 std
    out = {k: float(masked_error(v, target, valid)[keep].mean()) for k, v in guesses.items()}
    return {**out, "windows": int(keep.sum())}


def _key(run: RunState, store: Path, cfg: ProposalConfig, steps: int) -> dict[str, Any]:
    """What makes two trainings the same: the configuration, the steps, the store and the model it serves."""
    return to_jsonable({"config": cfg, "steps": steps, "store": str(Path(store).resolve()),
                        "model": model_key(run.shape, run.stats, _space(run)), "data": run.data})


def _space(run: RunState) -> ActionSpace:
    return action_space(run.config, run.stats)


def train_proposal(run_dir: Path, store: Path | None = None, steps: int = 2000, *,
                   config: ProposalConfig | None = None, device: str = "cpu", save_every: int = 200
                   ) -> ProposalReport:
    """Train the proposal of the run in `run_dir` (a run folder or one of its checkpoints) on `store` (default: the
    store the run was trained on) for `steps` steps, score it on the val windows and save it in
    `<run>/proposal/`. A saved proposal of the same configuration, steps, store and model is kept as it is
    (nothing to do); another is replaced once the new one is trained (the old stays until then). Its progress is
    kept every `save_every` steps (0: never): the same call after a stop or a kill continues from there."""
    config = config or ProposalConfig()
    run = RunState.read(Path(run_dir))
    store = Path(store) if store is not None else run.store
    if steps < 1 or save_every < 0:
        raise UserError(f"proposal steps {steps}, save_every {save_every}: need steps >= 1 and save_every >= 0")
    if _space(run).frame_dim == 0:
        raise UserError(f"{run.run_dir} was trained without actions: a proposal needs an action-conditioned run")
    # the run's lock (`<run>/LOCK`), as training holds it: a `train --resume` of this run or a second
    # `train-proposal` cannot run beside this one, and this one is refused (before writing anything) while another
    # process owns the run; released at the end, also on errors
    lock = RunLock.acquire(run.run_dir)
    try:
        return _train_owned(run, store, steps, config, device, save_every)
    finally:
        lock.release()


def _train_owned(run: RunState, store: Path, steps: int, config: ProposalConfig, device: str, save_every: int
                 ) -> ProposalReport:
    folder = proposal_dir(run.run_dir)
    key = _key(run, store, config, steps)
    saved = read_record(folder)
    if saved is not None and saved.get("key") == key and (folder / WEIGHTS).is_file() and \
            file_sha256(folder / WEIGHTS) == saved["weights_sha256"]:
        log.info("%s holds a proposal trained with this configuration: nothing to do", folder)
        return _report(folder, saved, trained=False)
    if saved is not None:
        log.info("%s holds a proposal trained otherwise (%s): training a new one", folder,
                 "; ".join(config_differences(saved.get("key", {}), key)[:4]))
    folder.mkdir(parents=True, exist_ok=True)
    partial = Partial(folder, key, save_every)
    net, losses, score = fit_proposal(run, store, steps, config, torch.device(device), partial)
    record = _save(folder, net, run, key, losses, score)
    partial.clear()
    return _report(folder, record, trained=True, resumed_from=partial.resumed_from)


def fit_proposal(run: RunState, store: Path, steps: int, config: ProposalConfig, device: torch.device,
                 partial: Partial | None = None) -> tuple[ProposalNet, list[float], dict[str, float] | None]:
    """A proposal trained for `run` on `store`'s episodes that the run recorded (its windows, its split; from and
    into `partial`'s progress where given): the net, the loss of every step and its val score (None where no val
    window is long enough). A pure function of its arguments (on the CPU, bit for bit)."""
    reader = TokenReader(store)
    if run.data is not None:
        where = run.checkpoint / "state.json"
        pin_episodes(reader, run.config, check_record(run.data, where), str(where))
    net = build_net(run.shape, _space(run).frame_dim, config).to(device)
    losses = fit(net, run_windows(run, reader, config, "train"), steps, device, partial)
    score = None
    try:
        if config.val_windows:
            score = evaluate(net, run_windows(run, reader, config, "val"), device)
    except UserError as e:
        log.warning("the proposal is not scored: %s", e)
    return net, losses, score


def _save(folder: Path, net: ProposalNet, run: RunState, key: dict[str, Any], losses: list[float],
          score: dict[str, float] | None) -> dict[str, Any]:
    """The weights, then the record naming their sha256 (written last: a reader sees the old pair or the new)."""
    with atomic_output(folder / WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, tmp)
    mean, std = frame_stats(_space(run))
    tail = losses[-max(1, len(losses) // 10):]
    record = {"key": key, "config": key["config"], "model": key["model"], "steps": key["steps"],
              "frame_dim": net.frame_dim, "params": net.params, "action_mean": mean.tolist(),
              "action_std": std.tolist(), "train_loss": statistics.fmean(tail), "action_error": score,
              "weights_sha256": file_sha256(folder / WEIGHTS)}
    atomic_write_json(folder / RECORD, record)
    return record


def _report(folder: Path, record: dict[str, Any], *, trained: bool, resumed_from: int = 0) -> ProposalReport:
    score = record.get("action_error")
    return ProposalReport(folder, trained, int(record["steps"]), int(record["params"]), float(record["train_loss"]),
                          None if score is None else {k: v for k, v in score.items() if k != "windows"},
                          0 if score is None else int(score["windows"]), resumed_from)
