"""The planning step shared by the LeRobot policy (`planner.lerobot_policy`) and the async-inference server
(`planner.serve`): a run loaded for planning (`load_planning`: the model on its labelled source's cameras and the
run's encoder), a goal (`GoalSpec` -> `load_goal` -> `Goal`: image files, a recorded episode frame, or gym-pusht's
fixed goal pose rendered in the simulator) and one goal-conditioned MPC step in latent space (`LatentMPC`: a planner of
the registry, `planner.planners.plan` - CEM, gradient descent, CEM seeded by the run's amortized proposal or the
proposal alone - on `planner.core.latent_cost`, warm-started from the previous plan, per-step changes clamped by
`planner.planners.spec_for`), as `planner.sim.run_trial` runs them in its closed loop.
Legend: C = cameras, T = frames, N = tokens, Z = token width, H = horizon, A = action width, S = state width.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.stage import UserError, to_jsonable
from planner.cem import CEMConfig, warm_start
from planner.core import WorldModel, latent_cost
from planner.gd import GDConfig
from planner.planners import PLANNERS, check_planner, expected_cost_rollout, plan, settings, spec_for
from planner.proposal import Observation, Proposal, proposal_for

GOAL_URI = "wmctl-goal:"
PUSHT_GOAL_AGENT = (256.0, 420.0)  # where the agent is drawn in gym-pusht's goal image (below the T)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GoalSpec:
    """Where a goal comes from: `images` (one file per camera of the run, in its camera order, + `state`, the
    goal's observation.state for models with proprioception), a recorded frame (`dataset`, `episode`, `frame`; -1:
    its last), or gym-pusht's fixed task (`pusht`: its `goal_pose`, the agent at `pusht_agent`)."""

    images: tuple[Path, ...] = ()
    state: tuple[float, ...] | None = None
    dataset: Path | None = None
    episode: int = 0
    frame: int = -1
    pusht: bool = False
    pusht_agent: tuple[float, float] = PUSHT_GOAL_AGENT

    def __post_init__(self) -> None:
        if sum([bool(self.images), self.dataset is not None, self.pusht]) != 1:
            raise UserError("a goal needs exactly one of --goal-image, --goal-dataset or --goal-pusht")

    def to_uri(self) -> str:
        """`wmctl-goal:{json}`: the goal as one string (a LeRobot config field, a RobotClient's
        `pretrained_name_or_path`)."""
        return GOAL_URI + json.dumps(to_jsonable(self), separators=(",", ":"))

    @classmethod
    def from_uri(cls, text: str) -> GoalSpec:
        if not text.startswith(GOAL_URI):
            raise UserError(f"goal {text[:60]!r}: expected {GOAL_URI}{{json}} (GoalSpec.to_uri)")
        try:
            d = json.loads(text.removeprefix(GOAL_URI))
            fields = {f.name for f in dataclasses.fields(cls)}
            if not isinstance(d, dict) or set(d) - fields:
                raise ValueError(f"unknown fields {sorted(set(d) - fields) if isinstance(d, dict) else d}")
            d["images"] = tuple(Path(p) for p in d.get("images", ()))
            for k in ("state", "pusht_agent"):
                if d.get(k) is not None:
                    d[k] = tuple(float(x) for x in d[k])
            if d.get("dataset") is not None:
                d["dataset"] = Path(d["dataset"])
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise UserError(f"goal {text[:80]!r}: {e}") from None


@dataclasses.dataclass
class Goal:
    images: np.ndarray  # [C, H, W, 3] uint8, the run's cameras in its order
    state: np.ndarray | None  # [S] the goal's observation.state (None: unknown)


def load_goal(spec: GoalSpec, *, cameras: list[str], size: int) -> Goal:
    """The goal's images (and state) from where `spec` says, for a run with `cameras` recorded at `size` px."""
    if spec.pusht:
        from pipeline.sims.pusht import make_env

        env = make_env(size)
        try:
            env.reset(seed=0)  # sets up the scene and its goal pose
            pose = np.asarray(env.unwrapped.goal_pose, np.float64)
            obs, _ = env.reset(options={"reset_to_state": np.array([*spec.pusht_agent, *pose])})
        finally:
            env.close()
        return Goal(obs["pixels"][None], np.asarray(spec.pusht_agent, np.float64))
    if spec.dataset is not None:
        return _dataset_goal(spec, cameras)
    if len(spec.images) != len(cameras):
        raise UserError(f"--goal-image: {len(spec.images)} files for the run's {len(cameras)} cameras "
                        f"({', '.join(cameras)}): give one per camera, in that order")
    from PIL import Image

    imgs = []
    for p in spec.images:
        try:
            imgs.append(np.asarray(Image.open(p).convert("RGB")))
        except OSError as e:
            raise UserError(f"--goal-image {p}: cannot read it as an image ({e}); pass a PNG or JPEG file") from None
    if len({im.shape for im in imgs}) > 1:
        raise UserError(f"--goal-image {', '.join(map(str, spec.images))}: the images differ in size; save every "
                        "camera's goal at its recorded size")
    return Goal(np.stack(imgs), None if spec.state is None else np.asarray(spec.state, np.float64))


def _dataset_goal(spec: GoalSpec, cameras: list[str]) -> Goal:
    from pipeline.lerobot_compat import dataset_classes
    from pipeline.lerobot_io import offline_env

    offline_env()
    root = Path(spec.dataset)
    if not (root / "meta" / "info.json").is_file():
        raise UserError(f"--goal-dataset {root}: not a LeRobot dataset (no meta/info.json); pass its root folder")
    ds = dataset_classes()[0](f"local/{root.name}", root=root, episodes=[spec.episode], video_backend="pyav")
    missing = [c for c in cameras if c not in ds.meta.features]
    if missing or ds.num_frames == 0:
        raise UserError(f"--goal-dataset {root}: episode {spec.episode} " + (
            f"lacks the run's cameras {missing}" if missing else "has no frames") + "; pick a dataset of this robot")
    i = spec.frame if spec.frame >= 0 else ds.num_frames + spec.frame
    if not 0 <= i < ds.num_frames:
        raise UserError(f"--goal-frame {spec.frame}: episode {spec.episode} of {root} has {ds.num_frames} frames")
    item = ds[i]
    imgs = np.stack([(item[c].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8) for c in cameras])
    state = item["observation.state"].numpy().astype(np.float64) if "observation.state" in item else None
    return Goal(imgs, state)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MPCConfig:
    horizon: int = 5  # frames planned
    execute: int = 2  # frames executed before replanning
    context: int = 2  # frames of history the model sees
    planner: str = "cem"  # a planner of `planner.planners.PLANNERS` (cem, gd, cem+proposal, proposal)
    cem: CEMConfig = CEMConfig()
    gd: GDConfig = GDConfig()
    k: int = 4
    max_delta_fraction: float = 0.5  # per-step change limit of the plan (planner.planners.spec_for)
    state_weight: float = 1.0
    cost_frames: str = "all"
    execute_plan: str = "best"
    seed: int = 0

    def __post_init__(self) -> None:
        check_planner(self.planner)
        if not 1 <= self.execute <= self.horizon or self.context < 1:
            raise UserError(f"--execute {self.execute} / --horizon {self.horizon} / --context {self.context}: need "
                            "1 <= execute <= horizon and context >= 1")
        if self.cost_frames not in ("all", "last") or self.execute_plan not in ("best", "mean"):
            raise UserError("--cost-frames: all or last; --execute-plan: best or mean")


Encode = Callable[[np.ndarray, np.ndarray], torch.Tensor]  # (images [C, H, W, 3] uint8, state [S]) -> [N, Z]


class LatentMPC:
    """One goal-conditioned MPC step in latent space (the body of `planner.sim.run_trial`'s loop): the goal encoded
    once, each plan warm-started from the previous one shifted by the frames executed since. A planner that uses
    the proposal has the run's loaded here (refused now, not at the first plan, where the run has none), or is
    given one (`proposal`).
    Thread-safe."""

    def __init__(self, wm: WorldModel, encode: Encode, cfg: MPCConfig, goal: Goal, *, proposal: Proposal | None = None):
        self.wm, self.encode, self.cfg = wm, encode, cfg
        self.spec = spec_for(wm, cfg.max_delta_fraction)
        self.proposal = proposal  # None: the run's, where the planner uses one
        if PLANNERS[cfg.planner].proposal and proposal is None:
            self.proposal = proposal_for(wm)
        self._lock = threading.RLock()
        self.plans, self.latencies = 0, []
        self.set_goal(goal)

    def set_goal(self, goal: Goal) -> None:
        """A new goal; the next plan starts afresh (no warm start from a plan towards the old goal)."""
        weight = self.cfg.state_weight
        state = goal.state
        if state is None:
            state = np.zeros(max(self.wm.state_dim, 1))
            weight = 0.0  # the goal's robot state is unknown: only its images count
        goal_NZ = self.encode(goal.images, state)
        frames = torch.ones(self.cfg.horizon) if self.cfg.cost_frames == "all" else None
        with self._lock:
            self.goal_NZ = goal_NZ
            self.cost = latent_cost(goal_NZ, state_dim=self.wm.state_dim, state_weight=weight, frame_weights=frames)
            self.plan_mean = None

    def reset(self) -> None:
        with self._lock:
            self.plan_mean = None

    def predict(self, context_TNZ: torch.Tensor, frames_PA: np.ndarray) -> torch.Tensor:
        """The model's latents [1, N, Z] after the frames [P, A] (model space) run from the context: where a plan
        starts when those frames execute while it is computed (one sample of a stochastic model)."""
        with self._lock:
            seed = int(np.random.default_rng([self.cfg.seed, self.plans, 1]).integers(2**31))
            rollout = self.wm.planning_rollout(context_TNZ, context_actions_TA=None, k=self.cfg.k, seed=seed)
            actions = torch.as_tensor(np.asarray(frames_PA), dtype=torch.float32)[None]
            return rollout(actions)[0, -1:].detach()

    def plan(self, context_TNZ: torch.Tensor, context_actions_TA: torch.Tensor | None, *, shift: int,
             previous_A: torch.Tensor | None = None) -> np.ndarray:
        """Plan from a context of latents (and the actions that led into its frames); `shift`: frames executed
        since the previous plan began (its warm start). Returns the plan's frames [H, A] in model space."""
        cfg = self.cfg
        with self._lock:
            seed = int(np.random.default_rng([cfg.seed, self.plans]).integers(2**31))
            t0 = time.perf_counter()
            rollout, cost = expected_cost_rollout(self.wm, context_TNZ, context_actions_TA, self.cost, k=cfg.k,
                                                  seed=seed)
            init = warm_start(self.plan_mean, shift, cfg.horizon, self.spec.dim)
            res = plan(cfg.planner, rollout, cost, self.spec, settings(cfg.planner, cfg), horizon=cfg.horizon,
                       generator=torch.Generator().manual_seed(seed), init_mean_HA=init, previous_A=previous_A,
                       observation=Observation(self.wm, context_TNZ[-1], self.goal_NZ, self.proposal))
            self.latencies.append(time.perf_counter() - t0)
            self.plans += 1
            self.plan_mean = res.mean
            return (res.mean if cfg.execute_plan == "mean" else res.actions).detach().cpu().numpy()


@dataclasses.dataclass
class Planning:
    """A run ready to plan with: the model on its labelled source's cameras, the run's encoder, what it recorded."""

    wm: Any
    encode: Encode
    cameras: list[str]
    size: int  # the recorded image size
    dataset_root: Path  # the labelled source's LeRobot dataset
    env: str | None  # the simulator it was recorded in (None: a real robot or unknown)


def load_planning(run: Path, *, device: str = "cpu", encoder: Path | None = None) -> Planning:
    """A trained run (or checkpoint) and its encoder (found in `encoder`, then where the store was encoded from)."""
    from featurestore.reader import TokenReader
    from planner.sim import labelled_source, observation_encoder
    from trainer.api import LoadedWorldModel

    wm = LoadedWorldModel.load(Path(run), device=device)
    if wm.actions.frame_dim == 0:
        raise UserError(f"{run}: this model was trained without actions; planning needs an action-conditioned run")
    reader = TokenReader(wm.store)
    source = labelled_source(reader)
    wm = wm.for_source(reader, source.name)
    hints = (str(encoder) if encoder else None, reader.store.encoder_location)
    return Planning(wm, observation_encoder(wm, device, hints=hints), source.cameras, source.size,
                    Path(source.rows.iloc[0].root), source.recorded_in)
