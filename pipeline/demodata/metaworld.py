"""Meta-World arm episodes (reach / push), written as a LeRobot v3.0 dataset: "an arm like the user's".

A Sawyer arm commanded with delta end-effector xyz + gripper (4-D, in [-1, 1]; 4 cm per unit at 20 Hz), seen by a
fixed exterior camera and a wrist camera. The actions come from Meta-World's shipped scripted policies with
exploration on top, so the data covers more than one path to each target: Gaussian noise on every action, and
random excursions (a few steps in one random direction) that the policy then recovers from. Each episode starts
from one of the benchmark's 50 task variations (object and target positions), chosen by the seed.

Recorded per frame t (before the action is applied): `observation.images.exterior` and
`observation.images.wrist` (H, W, 3), `observation.state` (end-effector xyz in m, gripper opening 0..1),
`observation.environment_state` (the full restorable simulator state: `pipeline.sims.metaworld`), `action`,
`next.reward` (Meta-World's shaped reward for the env's own target) and the task text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pipeline.demodata import Frame, WriterSettings, f32, vector_feature, video_feature, write_dataset
from pipeline.sims import ENV_STATE_KEY
from pipeline.sims.metaworld import (
    CAMERA_KEY,
    CAMERAS,
    RENDER,
    TASK_FIELDS,
    TASKS,
    MetaWorldSim,
    frame_skip_for,
)
from pipeline.stage import UserError

TASK_TEXT = {"reach": "Reach the target position with the gripper.",
             "push": "Push the puck to the target position on the table."}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetaworldDataConfig:
    out: Path
    task: str = "reach"
    episodes: int = 40
    seed: int = 0
    frames_per_episode: int = 40
    size: int = 96
    fps: int = 20
    action_free: bool = False
    noise: float = 0.3  # std of the Gaussian noise on every action (action units, range [-1, 1])
    excursion: float = 0.1  # chance per step of starting a random excursion of 2-5 steps
    repo_id: str = "local/metaworld"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"--task {self.task!r}: choose one of {TASKS}")
        if self.episodes < 1 or self.frames_per_episode < 4:
            raise UserError("need --episodes >= 1 and --frames-per-episode >= 4")
        if self.size < 64 or self.size % 2:
            raise UserError(f"--size {self.size}: AV1 needs an even size >= 64")
        frame_skip_for(self.fps)


class Explorer:
    """The scripted action plus exploration: Gaussian noise, and now and then a short random excursion."""

    def __init__(self, rng: np.random.Generator, noise: float, excursion: float):
        self.rng, self.noise, self.excursion = rng, noise, excursion
        self.left, self.direction = 0, np.zeros(4)

    def __call__(self, scripted: np.ndarray) -> np.ndarray:
        if self.left == 0 and self.rng.random() < self.excursion:
            self.left = int(self.rng.integers(2, 6))
            self.direction = np.append(self.rng.uniform(-1, 1, 3), self.rng.choice([-1.0, 1.0]))
        if self.left > 0:
            self.left -= 1
            action = self.direction.copy()
        else:
            action = scripted.astype(np.float64)
        action[:3] += self.rng.normal(0.0, self.noise, 3)
        return np.clip(action, -1.0, 1.0)


def features(cfg: MetaworldDataConfig, state_len: int) -> dict[str, dict]:
    env_names = [f"{f.strip('_')}_{c}" for f in TASK_FIELDS for c in "xyz"]
    env_names += [f"mujoco_{i}" for i in range(state_len - len(env_names))]
    feats = {CAMERA_KEY.format(role): video_feature(cfg.size, cfg.size) for role in CAMERAS}
    feats.update({
        "observation.state": vector_feature(["eef_x", "eef_y", "eef_z", "gripper_opening"]),
        ENV_STATE_KEY: {"dtype": "float64", "shape": (len(env_names),), "names": env_names},  # exact restore
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
    })
    if not cfg.action_free:
        feats["action"] = vector_feature(["delta_x", "delta_y", "delta_z", "gripper"])
    return feats


def episode_frames(cfg: MetaworldDataConfig, sim: MetaWorldSim, episode: int) -> Iterator[Frame]:
    rng = np.random.default_rng([cfg.seed, episode])
    images = sim.new_episode(int(rng.integers(len(sim.tasks))))
    explore = Explorer(rng, cfg.noise, cfg.excursion)
    for _ in range(cfg.frames_per_episode):
        action = explore(sim.scripted_action())
        frame: Frame = {
            CAMERA_KEY.format("exterior"): images[0],
            CAMERA_KEY.format("wrist"): images[1],
            "observation.state": f32(sim.robot_state()),
            ENV_STATE_KEY: sim.state(),
            "task": TASK_TEXT[cfg.task],
        }
        _, reward, *_ = sim.env.step(action)
        images = sim.render()
        frame["next.reward"] = f32([reward])
        if not cfg.action_free:
            frame["action"] = f32(action)
        yield frame


def run_data_metaworld(cfg: MetaworldDataConfig, force: bool = False,
                       on_progress: Callable[[int], None] | None = None) -> bool:
    sim = MetaWorldSim(cfg.task, cfg.size, fps=cfg.fps, seed=cfg.seed)
    try:
        state_len = len(sim.state())
        return write_dataset(
            out=cfg.out,
            repo_id=cfg.repo_id,
            features=features(cfg, state_len),
            settings=WriterSettings(fps=cfg.fps, robot_type="sawyer"),
            num_episodes=cfg.episodes,
            episode_fn=lambda ep: episode_frames(cfg, sim, ep),
            generator_config={"generator": "metaworld", **dataclasses.asdict(cfg), "render": RENDER,
                              "cameras": CAMERAS, "frame_skip": sim.env.frame_skip,
                              "action_scale": sim.env.action_scale},
            force=force,
            on_progress=on_progress,
        )
    finally:
        sim.close()
