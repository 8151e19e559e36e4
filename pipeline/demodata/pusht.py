"""gym-pusht rollouts of a scripted pusher, written as a LeRobot v3.0 dataset.

The pusher walks around the T block to a contact point behind it (seen from the goal), pushes through
the block's centre for a while, and re-plans; a share of pushes go in random directions so that the
data covers many contacts, not one trajectory. Actions are gym-pusht's absolute agent targets (px).

Recorded per frame t (before the action is applied): `observation.image` (H, W, 3), `observation.state`
(agent x, y), `observation.environment_state` (agent x, y, block x, y, block angle: the simulator state a
planner resets to), `action` (target x, y), `next.reward`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pipeline.demodata import Frame, WriterSettings, f32, vector_feature, video_feature, write_dataset
from pipeline.sims import ENV_STATE_KEY
from pipeline.sims.pusht import env_state, make_env
from pipeline.stage import UserError

GOAL_XY = np.array([256.0, 256.0])
TASK = "Push the T-shaped block onto the green T."
IMAGE_KEY = "observation.image"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PushtDataConfig:
    out: Path
    episodes: int = 20
    seed: int = 0
    frames_per_episode: int = 100
    size: int = 96  # rendered observation size (96 is gym-pusht's native size)
    action_free: bool = False
    repo_id: str = "local/pusht"

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.frames_per_episode < 4:
            raise UserError("need --episodes >= 1 and --frames-per-episode >= 4")
        if self.size < 64 or self.size % 2:
            raise UserError(f"--size {self.size}: AV1 needs an even size >= 64")


class ScriptedPusher:
    """Heuristic pusher: approach a contact point behind the block, push through it, re-plan.

    A share of steps (`explore`) jitters the target by up to `jitter` px: a world model learns what actions do
    only if they are not predictable from the frames before them, so the data must vary them step to step.
    """

    def __init__(self, rng: np.random.Generator, max_step: float = 30.0, noise: float = 3.0, explore: float = 0.3,
                 jitter: float = 35.0):
        self.rng, self.max_step, self.noise = rng, max_step, noise
        self.explore, self.jitter = explore, jitter
        self.direction = np.array([1.0, 0.0])
        self.push_left = 0

    def _replan(self, block_xy: np.ndarray) -> None:
        to_goal = GOAL_XY - block_xy
        if self.rng.random() < 0.3 or np.linalg.norm(to_goal) < 20:
            angle = self.rng.uniform(-math.pi, math.pi)  # exploratory push
        else:
            angle = math.atan2(to_goal[1], to_goal[0]) + self.rng.normal(0.0, 0.35)
        self.direction = np.array([math.cos(angle), math.sin(angle)])
        self.push_left = 0

    def __call__(self, agent_xy: np.ndarray, block_xy: np.ndarray) -> np.ndarray:
        if self.push_left <= 0 and self.rng.random() < 0.25:
            self._replan(block_xy)
        contact = block_xy - 60.0 * self.direction
        if self.push_left > 0:
            waypoint = agent_xy + self.max_step * self.direction
            self.push_left -= 1
        elif np.linalg.norm(contact - agent_xy) < 12.0:
            self.push_left = int(self.rng.integers(6, 16))
            waypoint = agent_xy + self.max_step * self.direction
        else:
            waypoint = contact
            # detour around the block when the straight path would cross it
            seg = contact - agent_xy
            t = np.clip(np.dot(block_xy - agent_xy, seg) / max(np.dot(seg, seg), 1e-6), 0.0, 1.0)
            if np.linalg.norm(agent_xy + t * seg - block_xy) < 55.0:
                perp = np.array([-seg[1], seg[0]]) / max(np.linalg.norm(seg), 1e-6)
                side = 1.0 if np.dot(agent_xy - block_xy, perp) >= 0 else -1.0
                waypoint = block_xy + side * 85.0 * perp
        step = waypoint - agent_xy
        norm = np.linalg.norm(step)
        if norm > self.max_step:
            step *= self.max_step / norm
        target = agent_xy + step + self.rng.normal(0.0, self.noise, size=2)
        if self.rng.random() < self.explore:
            target += self.rng.uniform(-self.jitter, self.jitter, size=2)
        return np.clip(target, 0.0, 512.0)


def features(cfg: PushtDataConfig) -> dict[str, dict]:
    feats = {
        IMAGE_KEY: video_feature(cfg.size, cfg.size),
        "observation.state": vector_feature(["agent_x", "agent_y"]),
        ENV_STATE_KEY: vector_feature(["agent_x", "agent_y", "block_x", "block_y", "block_angle"]),
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
    }
    if not cfg.action_free:
        feats["action"] = vector_feature(["target_x", "target_y"])
    return feats


def episode_frames(cfg: PushtDataConfig, episode: int) -> Iterator[Frame]:
    env = make_env(cfg.size)
    rng = np.random.default_rng([cfg.seed, episode])
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    policy = ScriptedPusher(rng)
    try:
        for _ in range(cfg.frames_per_episode):
            state = env_state(env)
            action = policy(state[:2], state[2:4])
            frame: Frame = {
                IMAGE_KEY: obs["pixels"],
                "observation.state": f32(obs["agent_pos"]),
                ENV_STATE_KEY: f32(state),
                "task": TASK,
            }
            obs, reward, _, _, _ = env.step(action)
            frame["next.reward"] = f32([reward])
            if not cfg.action_free:
                frame["action"] = f32(action)
            yield frame
    finally:
        env.close()


def run_data_pusht(cfg: PushtDataConfig, force: bool = False,
                   on_progress: Callable[[int], None] | None = None) -> bool:
    return write_dataset(
        out=cfg.out,
        repo_id=cfg.repo_id,
        features=features(cfg),
        settings=WriterSettings(fps=10, robot_type="pusht"),
        num_episodes=cfg.episodes,
        episode_fn=lambda ep: episode_frames(cfg, ep),
        generator_config={"generator": "pusht", **dataclasses.asdict(cfg)},
        force=force,
        on_progress=on_progress,
    )
