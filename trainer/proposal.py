"""The amortized proposal: a small goal-conditioned policy head that maps the current frame's latents and a goal
frame's latents to an action sequence of `horizon` model frames, in one forward pass. The planners use it to seed
CEM or in place of it (`planner.proposal`); `trainer.proposal_train` trains it on a run's labelled windows.

Its inputs are the world model's own latents (the normalised patch tokens, with proprioception the state token
last: what `LoadedWorldModel.normalize` gives and the planner passes as context and goal), in the model's full
camera layout; its outputs are per-frame actions normalised with the run's action statistics (`ActionSpace`),
turned back into the model's raw per-frame action space by `TrainedProposal.propose` (what CEM searches). It is
saved with its run, in `<run>/proposal/`: `proposal.json` (its configuration, what it was trained on and its val
scores) and `proposal.safetensors` (the weights, whose sha256 the JSON names: a torn pair is refused).
Legend: B = batch, N = latent tokens per frame, Z = token width, H = horizon (frames), A = action width per frame.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.stage import UserError, file_sha256, fingerprint, read_json, to_jsonable
from trainer.actions import ActionSpace
from trainer.tokens import FULL_FRAME, FrameLayout, TokenShape

PROPOSAL_DIR = "proposal"
RECORD = "proposal.json"
WEIGHTS = "proposal.safetensors"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProposalConfig:
    """The proposal's architecture and its training (the number of steps is `train_proposal`'s argument)."""

    horizon: int = 5  # model frames of actions proposed
    max_goal: int = 0  # goals drawn 1..max_goal model frames ahead of the current frame (0: 2 x horizon)
    width: int = 64  # per-token features inside the head
    queries: int = 4  # attention-pooling queries (each pools the frame's tokens into one vector)
    hidden: int = 256  # the MLP from the pooled vectors to the actions
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    val_windows: int = 128  # held-out windows scored after training
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.horizon, self.width, self.queries, self.hidden, self.batch_size) < 1 or self.max_goal < 0:
            raise UserError("proposal: horizon, width, queries, hidden and batch_size must be >= 1, max_goal >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.val_windows < 0:
            raise UserError("proposal: lr must be > 0; weight_decay, warmup_steps and val_windows >= 0")

    @property
    def goals(self) -> int:
        """The farthest goal (model frames ahead) it is trained on."""
        return self.max_goal or 2 * self.horizon

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProposalConfig:
        return cls(**d)


class ProposalNet(torch.nn.Module):
    """Per token: (goal - current, current) -> a small MLP + a learned position; attention pooling with `queries`
    learned queries over the tokens; with proprioception the current and goal states appended; an MLP to
    [H, A] normalised actions."""

    def __init__(self, *, tokens: int, enc_dim: int, state_dim: int, frame_dim: int, cfg: ProposalConfig):
        super().__init__()
        d = cfg.width
        self.state_dim, self.horizon, self.frame_dim = state_dim, cfg.horizon, frame_dim
        self.embed = torch.nn.Sequential(torch.nn.Linear(2 * enc_dim, d), torch.nn.GELU(), torch.nn.Linear(d, d))
        self.pos = torch.nn.Parameter(torch.randn(tokens, d) * 0.02)
        self.norm = torch.nn.LayerNorm(d)
        self.queries = torch.nn.Parameter(torch.randn(cfg.queries, d) / math.sqrt(d))
        self.head = torch.nn.Sequential(
            torch.nn.Linear(cfg.queries * d + 2 * state_dim, cfg.hidden), torch.nn.GELU(),
            torch.nn.Linear(cfg.hidden, cfg.hidden), torch.nn.GELU(),
            torch.nn.Linear(cfg.hidden, cfg.horizon * frame_dim))

    def forward(self, current_BNZ: torch.Tensor, goal_BNZ: torch.Tensor) -> torch.Tensor:
        x = self.embed(torch.cat([goal_BNZ - current_BNZ, current_BNZ], dim=-1)) + self.pos  # [B, N, d]
        weights = torch.softmax(self.norm(x) @ self.queries.T, dim=1)  # [B, N, Q]: a distribution over tokens
        parts = [torch.einsum("bnq,bnd->bqd", weights, x).flatten(1)]
        if self.state_dim:  # the state token's first channels: small next to the pooled patches, so given apart
            parts += [current_BNZ[:, -1, : self.state_dim], goal_BNZ[:, -1, : self.state_dim]]
        return self.head(torch.cat(parts, dim=-1)).view(-1, self.horizon, self.frame_dim)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_net(shape: TokenShape, frame_dim: int, cfg: ProposalConfig) -> ProposalNet:
    """A freshly initialised head for a model's frame (`shape`) and action width, from `cfg.seed` alone (the
    global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ProposalNet(tokens=shape.latent_tokens, enc_dim=shape.enc_dim, state_dim=shape.state_dim,
                           frame_dim=frame_dim, cfg=cfg)


def model_key(shape: TokenShape, stats: Any, space: ActionSpace) -> dict[str, Any]:
    """What a proposal must match in the world model it serves: its frame, its statistics (the proposal's inputs
    and outputs are normalised with them) and its action space."""
    return {"token_shape": to_jsonable(shape), "stats": fingerprint(stats.to_dict()),
            "actions": {"mode": space.mode, "frameskip": space.frameskip, "kinds": list(space.kinds),
                        "frame_dim": space.frame_dim}}


def frame_stats(space: ActionSpace) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std [frame_dim] a per-frame action is normalised with: the planning box is mean +- 2.5 std
    (`ActionSpace.bounds`), the same std `plan offline` scores action errors in."""
    lo, hi = space.bounds()
    return (lo + hi) / 2, (hi - lo) / 5


@dataclasses.dataclass
class TrainedProposal:
    """A proposal ready to plan with: `propose(current, goal)` -> the model's raw per-frame actions [H, A]. `layout`
    is the world model view's camera slots (a source with fewer cameras than the model: its tokens go into their
    slots, the others stay zero, as in training)."""

    net: ProposalNet
    shape: TokenShape
    action_mean: torch.Tensor  # [A] per frame
    action_std: torch.Tensor  # [A]
    record: dict[str, Any]
    layout: FrameLayout = FULL_FRAME

    @property
    def horizon(self) -> int:
        return self.net.horizon

    @property
    def device(self) -> torch.device:
        return self.action_mean.device

    @property
    def params(self) -> int:
        return self.net.params

    @torch.no_grad()
    def normalized(self, current_BNZ: torch.Tensor, goal_BNZ: torch.Tensor) -> torch.Tensor:
        """The head's output [B, H, A] (normalised actions) for latents in the model's full layout."""
        return self.net(current_BNZ.to(self.device, torch.float32), goal_BNZ.to(self.device, torch.float32))

    def propose(self, current_NZ: torch.Tensor, goal_NZ: torch.Tensor) -> torch.Tensor:
        """The current frame's latents [N, Z] and the goal's (this view's layout) -> raw per-frame actions [H, A]
        (float32, on the proposal's device)."""
        cur, goal = (full_frame(z, self.shape, self.layout) for z in (current_NZ, goal_NZ))
        return self.normalized(cur[None], goal[None])[0] * self.action_std + self.action_mean

    def for_model(self, wm: Any) -> TrainedProposal:
        """This proposal on a world model view (its camera layout), refused where it was trained for another
        model: another frame, other statistics or another action space."""
        want = model_key(wm.shape, wm.stats, wm.actions)
        if want != self.record["model"]:
            raise UserError(f"the proposal in {self.record.get('folder', '?')} was trained for another model (its "
                            "frame, statistics or action space differ from this one's): train it again for this run")
        return dataclasses.replace(self, layout=wm.layout)


def full_frame(z_NZ: torch.Tensor, shape: TokenShape, layout: FrameLayout) -> torch.Tensor:
    """A view's latents [N', Z] (its cameras' blocks, then the state token) -> the model's full frame [N, Z]: each
    camera block in its slot, absent slots zero (as `trainer.data.load_sample` fills them for training)."""
    if layout.slots is None or tuple(layout.slots) == tuple(range(shape.cameras)):
        return z_NZ
    P = shape.grid[0] * shape.grid[1]
    full = z_NZ.new_zeros((shape.latent_tokens, z_NZ.shape[-1]))
    for i, slot in enumerate(layout.slots):
        full[slot * P:(slot + 1) * P] = z_NZ[i * P:(i + 1) * P]
    if shape.state_dim:
        full[-1] = z_NZ[-1]
    return full


def proposal_dir(run_dir: Path) -> Path:
    return Path(run_dir) / PROPOSAL_DIR


def read_record(folder: Path) -> dict[str, Any] | None:
    """A saved proposal's record (proposal.json), or None where none is saved."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        rec = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}); remove {folder} and train the proposal "
                        "again") from None
    if not isinstance(rec, dict) or not {"config", "model", "weights_sha256", "frame_dim"} <= set(rec):
        raise UserError(f"{path} is not a proposal record; remove {folder} and train the proposal again")
    return rec


def load_proposal(folder: Path, *, device: str | torch.device = "cpu") -> TrainedProposal:
    """The proposal saved in `folder` (`<run>/proposal`), its weights checked against the record's sha256."""
    folder = Path(folder)
    rec = read_record(folder)
    if rec is None:
        raise UserError(f"no proposal in {folder}: train one first: `wmctl train-proposal --run {folder.parent}`")
    weights = folder / WEIGHTS
    if not weights.is_file() or file_sha256(weights) != rec["weights_sha256"]:
        raise UserError(f"{weights} is missing or is not the one {folder / RECORD} names (a write was torn): train "
                        "the proposal again")
    shape = TokenShape.from_dict(rec["model"]["token_shape"])
    net = build_net(shape, int(rec["frame_dim"]), ProposalConfig.from_json(rec["config"]))
    net.load_state_dict(load_file(weights))
    dev = torch.device(device)
    net = net.to(dev).eval().requires_grad_(False)
    mean, std = (torch.tensor(rec[k], dtype=torch.float32, device=dev) for k in ("action_mean", "action_std"))
    return TrainedProposal(net, shape, mean, std, {**rec, "folder": str(folder)})


_LOADED: dict[tuple[str, int, str], TrainedProposal] = {}
_LOCK = threading.Lock()


def proposal_of(wm: Any) -> TrainedProposal:
    """The proposal trained for a loaded world model's run (`<run>/proposal`), on that model's view: loaded once
    per process and device (again when the record changes, e.g. trained anew)."""
    from trainer.runs import run_dir_of

    folder = proposal_dir(run_dir_of(Path(wm.checkpoint)))
    record = folder / RECORD
    if not record.is_file():
        run = run_dir_of(Path(wm.checkpoint))
        raise UserError(f"{run} has no trained proposal ({record} is missing): run `wmctl train-proposal --run {run}` "
                        "first (or plan with --planner cem or gd)")
    key = (str(folder.resolve()), record.stat().st_mtime_ns, str(wm.device))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = load_proposal(folder, device=wm.device)
        return _LOADED[key].for_model(wm)


def fresh_proposal(wm: Any, cfg: ProposalConfig | None = None) -> TrainedProposal:
    """A freshly initialised proposal for a world model (timing only: `wmctl bench plan`'s proposal rows)."""
    cfg = cfg or ProposalConfig()
    space = wm.actions
    net = build_net(wm.shape, space.frame_dim, cfg).to(wm.device).eval().requires_grad_(False)
    mean, std = (torch.as_tensor(x, dtype=torch.float32, device=wm.device) for x in frame_stats(space))
    rec = {"config": to_jsonable(cfg), "model": model_key(wm.shape, wm.stats, space), "frame_dim": space.frame_dim,
           "folder": "(fresh)"}
    return TrainedProposal(net, wm.shape, mean, std, rec, wm.layout)
