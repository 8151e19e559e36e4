"""wmctl's goal-conditioned latent MPC as a LeRobot policy, run by LeRobot's own evaluation harness.

`WmctlPolicy` (policy type "wmctl", config `WmctlConfig`, registered with `PreTrainedConfig.register_subclass`, so
`lerobot.policies.factory.make_policy` / `get_policy_class("wmctl")` / `make_pre_post_processors` find it) is built
from a trained run, the run's encoder and a goal (`planner.latent_mpc.GoalSpec`: image files, a recorded episode
frame, or gym-pusht's fixed goal pose rendered in the simulator). `select_action` returns the next action of the
current plan: the observation is encoded at each model frame with the run's encoder, `horizon` frames are planned
in latent space (`planner.latent_mpc.LatentMPC`, warm-started from the previous plan), `execute` frames of it run,
then it replans, as `planner.sim.run_trial` does; `reset` clears the plan. `run_lerobot_eval` runs it through
`lerobot.scripts.lerobot_eval.eval_policy_all` on a LeRobot env (`lerobot.envs.factory.make_env`) and returns
LeRobot's info dict (its `pc_success`) with the plan latencies.

Observations arrive as LeRobot's `preprocess_observation` makes them (`observation.image[s.*]` float [1, 3, H, W]
in [0, 1], `observation.state` [1, S]); the policy turns the images back to uint8 frames for the run's encoder,
which resizes them as it did the recorded frames. One environment at a time (`--eval.batch_size=1`).
"""

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs import PreTrainedConfig
from lerobot.optim import AdamConfig
from lerobot.policies.pretrained import PreTrainedPolicy

from pipeline.stage import UserError, atomic_write_json, to_jsonable
from planner.cem import CEMConfig
from planner.latent_mpc import Goal, GoalSpec, LatentMPC, MPCConfig, Planning, load_goal, load_planning

log = logging.getLogger(__name__)

@PreTrainedConfig.register_subclass("wmctl")
@dataclasses.dataclass
class WmctlConfig(PreTrainedConfig):
    """LeRobot's config of the wmctl planning policy (a draccus dataclass like every LeRobot policy config: mutable,
    since LeRobot's `__post_init__` and `make_policy` fill in the device and the features)."""

    run: str = ""  # run folder or checkpoint
    goal: str = ""  # GoalSpec.to_uri()
    encoder: str = ""  # the encoder's folder ("" : where the store was encoded from, then its recorded name)
    horizon: int = 5
    execute: int = 2
    context: int = 2
    planner: str = "cem"
    samples: int = 64
    elites: int = 8
    iterations: int = 5
    k: int = 4
    max_delta_fraction: float = 0.5
    state_weight: float = 1.0
    seed: int = 0
    camera_map: dict[str, str] = dataclasses.field(default_factory=dict)  # run camera -> observation key
    action_repeat: int = 1  # env steps per model step (an env faster than the data: Meta-World 80 Hz / 20 Hz = 4)

    def mpc(self) -> MPCConfig:
        return MPCConfig(horizon=self.horizon, execute=self.execute, context=self.context, planner=self.planner,
                         cem=CEMConfig(samples=self.samples, elites=self.elites, iterations=self.iterations),
                         k=self.k, max_delta_fraction=self.max_delta_fraction, state_weight=self.state_weight,
                         seed=self.seed)

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> None:
        return None

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamConfig:
        return AdamConfig(lr=0.0)  # nothing to train here: `wmctl train` trains the world model

    def get_scheduler_preset(self) -> None:
        return None

    def validate_features(self) -> None:
        if self.action_repeat < 1:
            raise UserError(f"--policy.action_repeat {self.action_repeat}: must be >= 1")


def make_wmctl_pre_post_processors(config: WmctlConfig, dataset_stats: dict | None = None) -> tuple[Any, Any]:
    """LeRobot's canonical pipelines without normalisation (the world model normalises its own inputs): rename,
    batch, device in; cpu out. Found by `lerobot.policies.make_pre_post_processors` by its naming convention."""
    from lerobot.processor import AddBatchDimensionProcessorStep, DeviceProcessorStep, RenameObservationsProcessorStep
    from lerobot.processor.factory import make_policy_processor_pipelines

    return make_policy_processor_pipelines(
        input_steps=[RenameObservationsProcessorStep(rename_map={}), AddBatchDimensionProcessorStep(),
                     DeviceProcessorStep(device=config.device)],
        output_steps=[DeviceProcessorStep(device="cpu")])


class WmctlPolicy(PreTrainedPolicy):
    """Goal-conditioned latent MPC with a wmctl run, behind LeRobot's policy interface (one environment at a time).
    `episode_latencies`: the plan latencies (s) of each episode since construction (`reset` starts a new one)."""

    config_class = WmctlConfig
    name = "wmctl"

    def __init__(self, config: WmctlConfig, planning: Planning | None = None, goal: Goal | None = None, **kwargs):
        super().__init__(config)
        if planning is None:
            if not config.run:
                raise UserError("--policy.run: name the wmctl run (or checkpoint) to plan with")
            planning = load_planning(Path(config.run), device=config.device or "cpu",
                                     encoder=Path(config.encoder) if config.encoder else None)
        if goal is None:
            goal = load_goal(GoalSpec.from_uri(config.goal), cameras=planning.cameras, size=planning.size)
        self.planning = planning
        self.mpc = LatentMPC(planning.wm, planning.encode, config.mpc(), goal)
        self.episode_latencies: list[list[float]] = []
        self.reset()

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, *, config: WmctlConfig | None = None, **kwargs) -> "WmctlPolicy":
        """A saved config.json is the whole policy (the weights are the run's): no model.safetensors to load."""
        config = config or PreTrainedConfig.from_pretrained(pretrained_name_or_path)
        return cls(config).eval()

    def _save_pretrained(self, save_directory: Path, state_dict: dict | None = None) -> None:
        self.config._save_pretrained(save_directory)

    def get_optim_params(self) -> dict:
        return {}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict | None]:
        raise NotImplementedError("the wmctl policy plans with a trained world model; train it with `wmctl train`")

    def reset(self) -> None:
        """A new episode: no plan, no history."""
        self.mpc.reset()
        self._history: list[torch.Tensor] = []  # latents at the last model frame boundaries
        self._executed: list[np.ndarray] = []  # the model frame actions executed, leading into history[1:]
        self._frames: collections.deque = collections.deque()  # frames of the plan not started yet
        self._frame: np.ndarray | None = None  # the frame executing
        self._frame_steps: collections.deque = collections.deque()  # its model steps not started yet
        self._held, self._repeats_left = None, 0
        self.episode_latencies.append([])

    def _observation(self, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(images [C, H, W, 3] uint8 in the run's camera order, state [S]) of the one environment in `batch`."""
        images = [k for k in batch if k.startswith("observation.image")]
        imgs = []
        for cam in self.planning.cameras:
            key = self.config.camera_map.get(cam, cam)
            if key not in batch and len(images) == 1 and len(self.planning.cameras) == 1:
                key = images[0]
            if key not in batch:
                raise UserError(f"the observation has no {key!r} (images: {images}); map the run's camera {cam!r} "
                                "to one with --policy.camera_map")
            x = batch[key]
            if x.ndim != 4 or x.shape[0] != 1:
                raise UserError(f"{key}: shape {tuple(x.shape)}; the wmctl policy runs one environment "
                                "(--eval.batch_size=1)")
            imgs.append((x[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8))
        state = batch["observation.state"][0].double().cpu().numpy() if "observation.state" in batch else np.zeros(0)
        return np.stack(imgs), state

    def _replan(self) -> None:
        cfg = self.mpc.cfg
        ctx = torch.stack(self._history)
        acts = [np.zeros(self.mpc.spec.dim)] + self._executed
        ctx_actions = torch.as_tensor(np.stack(acts[-len(ctx):]), dtype=torch.float32)
        prev = torch.as_tensor(self._executed[-1], dtype=torch.float32) if self._executed else None
        frames_HA = self.mpc.plan(ctx, ctx_actions, shift=cfg.execute, previous_A=prev)
        self.episode_latencies[-1].append(self.mpc.latencies[-1])
        self._frames.extend(frames_HA[:cfg.execute])

    @torch.no_grad()
    def select_action(self, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """The next environment action [1, A] of the current plan (planning when its executed part is used up)."""
        images, state = self._observation(batch)
        if self._repeats_left == 0:  # a model step ends here
            if not self._frame_steps:  # ... and a model frame: its observation joins the history
                if self._frame is not None:
                    self._executed = (self._executed + [self._frame])[-self.mpc.cfg.context:]
                self._history = (self._history + [self.planning.encode(images, state)])[-self.mpc.cfg.context:]
                if not self._frames:
                    self._replan()
                self._frame = self._frames.popleft()
                self._frame_steps.extend(self.planning.wm.actions.frame_steps(self._frame))
            # converted once with the state it starts from, then held for its repeats
            self._held = self.planning.wm.actions.to_env(self._frame_steps.popleft(), state)
            self._repeats_left = self.config.action_repeat
        self._repeats_left -= 1
        return torch.as_tensor(self._held, dtype=torch.float32)[None]

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """A fresh plan from this observation alone: its `execute` frames as environment actions [1, T, A]."""
        images, state = self._observation(batch)
        frames = self.mpc.plan(self.planning.encode(images, state)[None], None, shift=self.mpc.cfg.execute)
        steps = [self.planning.wm.actions.to_env(s, state) for f in frames[:self.mpc.cfg.execute]
                 for s in self.planning.wm.actions.frame_steps(f)]
        return torch.as_tensor(np.stack(steps), dtype=torch.float32)[None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LerobotEvalConfig:
    run: Path
    goal: GoalSpec = GoalSpec(pusht=True)
    env: str = "pusht"  # a LeRobot env type (`--env.type`)
    task: str | None = None  # its task (Meta-World: e.g. reach-v3); None: the env's default
    episodes: int = 10
    max_steps: int = 300  # env steps per episode
    seed: int = 1000  # LeRobot's start_seed: episode i is seeded seed + i
    mpc: MPCConfig = MPCConfig()
    camera_map: tuple[tuple[str, str], ...] = ()  # (run camera, observation key)
    action_repeat: int = 1
    encoder: Path | None = None
    device: str = "cpu"
    out: Path | None = None  # writes <out>/eval_info.json

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.max_steps < 1:
            raise UserError(f"--episodes {self.episodes} / --max-steps {self.max_steps}: must be >= 1")


def policy_config(cfg: LerobotEvalConfig) -> WmctlConfig:
    m = cfg.mpc
    return WmctlConfig(run=str(cfg.run), goal=cfg.goal.to_uri(), encoder=str(cfg.encoder or ""), horizon=m.horizon,
                       execute=m.execute, context=m.context, planner=m.planner, samples=m.cem.samples,
                       elites=m.cem.elites, iterations=m.cem.iterations, k=m.k,
                       max_delta_fraction=m.max_delta_fraction, state_weight=m.state_weight, seed=m.seed,
                       camera_map=dict(cfg.camera_map), action_repeat=cfg.action_repeat, device=cfg.device)


def run_lerobot_eval(cfg: LerobotEvalConfig, *, policy: WmctlPolicy | None = None) -> dict[str, Any]:
    """`cfg.episodes` episodes of the wmctl policy in a LeRobot env, by LeRobot's own harness (its env factory,
    `make_policy`, processors and `eval_policy_all`, as `lerobot-eval` runs them). Returns {"lerobot": LeRobot's
    info dict (its `overall.pc_success`), "plan_latency_s": p50/p95/mean/plans, "per_episode_latency_s": [...]}."""
    from lerobot.envs.factory import make_env, make_env_config, make_env_pre_post_processors
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.scripts.lerobot_eval import eval_policy_all

    pcfg = policy_config(cfg)
    if cfg.env == "metaworld":
        from pipeline.sims.metaworld import require_egl

        require_egl()  # headless MuJoCo: before LeRobot's env imports it
    try:
        env_cfg = make_env_config(cfg.env, **({"episode_length": cfg.max_steps} if cfg.env == "pusht" else {}),
                                  **({"task": cfg.task} if cfg.task else {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"--env {cfg.env}: {e}") from None
    envs = make_env(env_cfg, n_envs=1)
    for group in envs.values():
        for vec in group.values():
            for sub in getattr(vec, "envs", []):
                if getattr(sub.unwrapped, "_max_episode_steps", cfg.max_steps) > cfg.max_steps:
                    sub.unwrapped._max_episode_steps = cfg.max_steps  # Meta-World's fixed 500, read by `rollout`
    if policy is None:
        policy = make_policy(cfg=pcfg, env_cfg=env_cfg)
    pre, post = make_pre_post_processors(policy_cfg=policy.config)
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=policy.config)
    done = len(policy.episode_latencies)
    with torch.no_grad():
        info = eval_policy_all(envs=envs, policy=policy, env_preprocessor=env_pre, env_postprocessor=env_post,
                               preprocessor=pre, postprocessor=post, n_episodes=cfg.episodes, start_seed=cfg.seed)
    per_episode = [x for x in policy.episode_latencies[done:] if x]
    lat = [x for ep in per_episode for x in ep]
    out = {"lerobot": info, "env": cfg.env, "task": cfg.task, "episodes": cfg.episodes,
           "plan_latency_s": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                              "mean": float(np.mean(lat)), "plans": len(lat)} if lat else None,
           "per_episode_latency_s": [float(np.median(ep)) for ep in per_episode]}
    log.info("lerobot eval %s: pc_success %.1f over %d episodes; plan latency p50 %s", cfg.env,
             info["overall"]["pc_success"], info["overall"]["n_episodes"],
             f"{out['plan_latency_s']['p50']:.3f} s" if lat else "-")
    if cfg.out is not None:
        atomic_write_json(Path(cfg.out) / "eval_info.json", to_jsonable(out))
    return out
