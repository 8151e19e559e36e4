"""A synthetic DROID-shaped LeRobot v3.0 set: 3 cameras at 180x320, 15 fps, 8-D state and action.

A gripper moves over a textured table with a few coloured pucks; when it is low and touches a puck it
pushes it along, so frames depend on the action (learnable action-conditioned dynamics). Cameras:
`exterior_1_left` (top-down), `exterior_2_left` (oblique side view, height visible) and `wrist_left`
(egocentric, follows the gripper position and yaw). Small file-size limits make episodes land in several
data and video files (and chunk folders), as in a real large dataset.

state  = [x, y, z, roll, pitch, yaw, gripper, gripper_velocity]
action = [dx, dy, dz, droll, dpitch, dyaw, gripper_target, gripper_velocity_target]

`--arm own` plays "your own arm" in the same world: 2 cameras under other keys (`observation.images.front`, the
top-down view, and `observation.images.wrist`), 10 fps, a 7-D delta end-effector action and a 7-D state:

state  = [x, y, z, roll, pitch, yaw, gripper]
action = [dx, dy, dz, droll, dpitch, dyaw, gripper_target]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pipeline.demodata import Frame, WriterSettings, f32, vector_feature, video_feature, write_dataset
from pipeline.stage import UserError

CAMERAS = (
    "observation.images.exterior_1_left",
    "observation.images.exterior_2_left",
    "observation.images.wrist_left",
)
H, W = 180, 320
STATE_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper", "gripper_vel"]
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper_target", "gripper_vel_target"]


@dataclasses.dataclass(frozen=True)
class Arm:
    """How an embodiment records the world: its rate, its camera keys (-> the rendered view) and the width of its
    state and action (the first `dims` of the world's 8)."""

    fps: int
    cameras: dict[str, str]
    dims: int


ARMS = {
    "droid": Arm(15, {c: c for c in CAMERAS}, 8),
    # "your own arm": the world's top-down and wrist views under other keys, 10 fps, 7-D (no gripper-velocity target)
    "own": Arm(10, {"observation.images.front": CAMERAS[0], "observation.images.wrist": CAMERAS[2]}, 7),
}
TASKS = ("push the red puck to the left", "push the blue puck forward", "sweep the table")
PUCK_COLORS = np.array([[220, 40, 40], [40, 80, 220], [240, 200, 40]], dtype=np.float32)
PUCK_RADIUS = 0.07
TABLE = (-1.0, 1.0, -0.6, 0.6)  # x range, y range (metres, table frame)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MulticamDataConfig:
    out: Path
    episodes: int = 8
    seed: int = 0
    min_frames: int = 40
    max_frames: int = 70
    action_free: bool = False
    repo_id: str = "local/multicam"
    data_files_size_in_mb: float = 0.015  # tiny limits: ~2 episodes per data/video file, several chunk folders
    video_files_size_in_mb: float = 0.1
    chunks_size: int = 3
    episodes_per_scene: int = 2
    arm: str = "droid"  # droid: 3 cameras, 8-D, 15 fps; own: "your own arm", 2 other cameras, 7-D, 10 fps

    def __post_init__(self) -> None:
        if self.episodes < 1 or not 8 <= self.min_frames <= self.max_frames:
            raise UserError("need --episodes >= 1 and 8 <= min_frames <= max_frames")
        if self.arm not in ARMS:
            raise UserError(f"--arm {self.arm!r}: one of {list(ARMS)}")


@dataclasses.dataclass
class World:
    gripper: np.ndarray  # [x, y, z, roll, pitch, yaw, opening, opening_vel]
    pucks: np.ndarray  # [P, 2] xy

    def step(self, action: np.ndarray) -> None:
        g = self.gripper
        prev_xy = g[:2].copy()
        g[0:3] += action[0:3]
        g[3:6] += action[3:6]
        g[0] = np.clip(g[0], TABLE[0], TABLE[1])
        g[1] = np.clip(g[1], TABLE[2], TABLE[3])
        g[2] = np.clip(g[2], 0.0, 0.5)
        g[3:5] = np.clip(g[3:5], -0.4, 0.4)
        g[7] = 0.5 * g[7] + 0.5 * action[7]
        g[6] = np.clip(g[6] + 0.3 * (action[6] - g[6]) + 0.1 * g[7], 0.0, 1.0)
        if g[2] < 0.12:  # low enough to touch: pucks in contact are pushed out of the gripper's way
            for p in self.pucks:
                d = p - g[:2]
                dist = float(np.linalg.norm(d))
                reach = PUCK_RADIUS + 0.05 + 0.03 * g[6]
                if dist < reach:
                    push = g[:2] - prev_xy
                    p += push + (reach - dist) * d / max(dist, 1e-6)
            self.pucks[:, 0] = np.clip(self.pucks[:, 0], TABLE[0], TABLE[1])
            self.pucks[:, 1] = np.clip(self.pucks[:, 1], TABLE[2], TABLE[3])


def _table_color(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Static table texture: wood-like gradient with a faint grid, [..., 3] float."""
    base = np.stack([150 + 30 * np.sin(3 * x + 1), 120 + 20 * np.sin(2 * y), 90 + 10 * np.cos(4 * x * y)], -1)
    grid = ((np.floor(x * 5) + np.floor(y * 5)) % 2)[..., None] * 12.0
    inside = ((x > TABLE[0]) & (x < TABLE[1]) & (y > TABLE[2]) & (y < TABLE[3]))[..., None]
    return np.where(inside, base + grid, 60.0)


def _paint_world(x: np.ndarray, y: np.ndarray, world: World, gripper_scale: float = 1.0) -> np.ndarray:
    img = _table_color(x, y)
    g = world.gripper
    shadow = (x - g[0]) ** 2 + (y - g[1]) ** 2 < (0.05 + 0.1 * g[2]) ** 2
    img = np.where(shadow[..., None], img * 0.6, img)
    for p, c in zip(world.pucks, PUCK_COLORS):
        img = np.where(((x - p[0]) ** 2 + (y - p[1]) ** 2 < PUCK_RADIUS**2)[..., None], c, img)
    # the gripper: two fingers whose gap is the opening, seen from above; larger when higher
    cos, sin = math.cos(g[5]), math.sin(g[5])
    u = (x - g[0]) * cos + (y - g[1]) * sin
    v = -(x - g[0]) * sin + (y - g[1]) * cos
    s = gripper_scale * (1.0 + 1.5 * g[2])
    gap = (0.02 + 0.05 * g[6]) * s
    finger = (np.abs(u) < 0.025 * s) & (np.abs(np.abs(v) - gap) < 0.015 * s)
    return np.where(finger[..., None], np.array([30.0, 30.0, 30.0]), img)


def render(world: World) -> dict[str, np.ndarray]:
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    # top-down: the whole table
    top = _paint_world(TABLE[0] + (xs + 0.5) / W * 2.0, TABLE[3] - (ys + 0.5) / H * 1.2, world)
    # oblique: rows map to depth with perspective; the gripper is drawn raised by its height
    depth = 0.35 + (ys + 0.5) / H
    side = _paint_world((xs / W - 0.5) * 2.4 / depth, TABLE[3] - (ys / H) * 1.4, world, gripper_scale=0.8)
    g = world.gripper
    row = (TABLE[3] - g[1]) / 1.4 * H  # where the gripper's table point lands in this view
    col = (g[0] * (0.35 + (row + 0.5) / H) / 2.4 + 0.5) * W
    tip = row - g[2] * 200  # the arm ends above it, higher when the gripper is higher
    stick = (np.abs(xs - col) < 4) & (ys > tip - 40) & (ys < tip)
    side = np.where(stick[..., None], np.array([70.0, 70.0, 80.0]), side)
    # wrist: follows the gripper; yaw rotates the view, roll/pitch shift it, height zooms
    zoom = 0.25 + 0.8 * g[2]
    cos, sin = math.cos(g[5]), math.sin(g[5])
    px = (xs - W / 2) / W * zoom * 2 + 0.3 * g[3]
    py = (ys - H / 2) / H * zoom * 1.2 + 0.3 * g[4]
    wrist = _paint_world(g[0] + px * cos - py * sin, g[1] + px * sin + py * cos, world, gripper_scale=0.6)
    return {k: np.clip(img, 0, 255).astype(np.uint8) for k, img in zip(CAMERAS, (top, side, wrist))}


class ScriptedArm:
    """Smooth random motion with an attraction to a target puck, dips to table height, gripper toggles."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.noise = np.zeros(8)
        self.target = 0

    def __call__(self, world: World) -> np.ndarray:
        r = self.rng
        if r.random() < 0.05:
            self.target = int(r.integers(len(world.pucks)))
        self.noise = 0.8 * self.noise + 0.2 * r.normal(0.0, 1.0, size=8)
        g = world.gripper
        to_puck = world.pucks[self.target] - g[:2]
        a = np.zeros(8)
        a[0:2] = np.clip(0.08 * to_puck / max(np.linalg.norm(to_puck), 0.1) + 0.03 * self.noise[0:2], -0.06, 0.06)
        a[2] = np.clip(0.02 * self.noise[2] - 0.01 * (g[2] - 0.08), -0.04, 0.04)
        a[3:6] = 0.05 * self.noise[3:6]
        a[6] = 1.0 if self.noise[6] > 0 else 0.0
        a[7] = np.clip(self.noise[7], -1.0, 1.0)
        return a


def features(cfg: MulticamDataConfig) -> dict[str, dict]:
    arm = ARMS[cfg.arm]
    feats = {cam: video_feature(H, W) for cam in arm.cameras}
    feats["observation.state"] = vector_feature(STATE_NAMES[: arm.dims])
    if not cfg.action_free:
        feats["action"] = vector_feature(ACTION_NAMES[: arm.dims])
    return feats


def episode_frames(cfg: MulticamDataConfig, episode: int) -> Iterator[Frame]:
    rng = np.random.default_rng([cfg.seed, episode])
    world = World(
        gripper=np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.4, 0.4), 0.2, 0, 0, rng.uniform(-1, 1), 0.5, 0.0]),
        pucks=np.stack([rng.uniform([-0.8, -0.45], [0.8, 0.45]) for _ in range(len(PUCK_COLORS))]),
    )
    policy, arm = ScriptedArm(rng), ARMS[cfg.arm]
    # DROID-like: several episodes per scene; the scene is in the task text (ingest --split-by 'task:scene (\d+)')
    task = f"{TASKS[int(rng.integers(len(TASKS)))]} (scene {episode // cfg.episodes_per_scene})"
    for _ in range(int(rng.integers(cfg.min_frames, cfg.max_frames + 1))):
        action = policy(world)
        action[arm.dims:] = 0.0  # what the arm cannot command (the 7-D arm: no gripper-velocity target)
        views = render(world)
        frame: Frame = {key: views[view] for key, view in arm.cameras.items()}
        frame["observation.state"] = f32(world.gripper[: arm.dims])
        frame["task"] = task
        if not cfg.action_free:
            frame["action"] = f32(action[: arm.dims])
        world.step(action)
        yield frame


def run_data_multicam(cfg: MulticamDataConfig, force: bool = False,
                      on_progress: Callable[[int], None] | None = None) -> bool:
    return write_dataset(
        out=cfg.out,
        repo_id=cfg.repo_id,
        features=features(cfg),
        settings=WriterSettings(
            fps=ARMS[cfg.arm].fps,
            robot_type="synthetic_arm",
            data_files_size_in_mb=cfg.data_files_size_in_mb,
            video_files_size_in_mb=cfg.video_files_size_in_mb,
            chunks_size=cfg.chunks_size,
        ),
        num_episodes=cfg.episodes,
        episode_fn=lambda ep: episode_frames(cfg, ep),
        generator_config={"generator": "multicam", **dataclasses.asdict(cfg)},
        force=force,
        on_progress=on_progress,
    )
