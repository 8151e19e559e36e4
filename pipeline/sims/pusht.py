"""gym-pusht behind the `Simulator` interface: reset to a recorded state, step with an absolute agent target.

State `[agent x, agent y, block x, block y, block angle]` (what `reset(options={"reset_to_state": ...})` takes);
the robot state is the agent's position; success is DINO-WM's PushT rule.
"""

from __future__ import annotations

import math

import numpy as np


def make_env(size: int = 96):
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
    import gymnasium as gym

    return gym.make(
        "gym_pusht/PushT-v0",
        obs_type="pixels_agent_pos",
        render_mode="rgb_array",
        observation_width=size,
        observation_height=size,
    )


def env_state(env) -> np.ndarray:
    """[agent x, agent y, block x, block y, block angle]: what `reset(options={"reset_to_state": ...})` takes."""
    u = env.unwrapped
    return np.array([*u.agent.position, *u.block.position, u.block.angle % (2 * math.pi)], dtype=np.float64)


def pusht_distances(goal_state: np.ndarray, state: np.ndarray) -> tuple[float, float]:
    """(position distance over agent + block xy, block angle distance) in px and radians."""
    pos = float(np.linalg.norm(goal_state[:4] - state[:4]))
    ang = abs(float(goal_state[4] - state[4])) % (2 * math.pi)
    return pos, min(ang, 2 * math.pi - ang)


POS_TOL, ANGLE_TOL = 20.0, math.pi / 9  # the success rule's tolerances (px over agent + block xy, radians)


def pusht_probe_targets(states_NS: np.ndarray) -> dict[str, np.ndarray]:
    """agent x/y, block x/y (px) and the block angle as sin/cos (an angle is not linear in anything periodic)."""
    s = np.asarray(states_NS, dtype=np.float64)
    return {"agent_x": s[:, 0], "agent_y": s[:, 1], "block_x": s[:, 2], "block_y": s[:, 3],
            "block_sin": np.sin(s[:, 4]), "block_cos": np.cos(s[:, 4])}


def pusht_goal_group(start_state: np.ndarray, goal_state: np.ndarray) -> str:
    """"push" when the block's goal pose is beyond the success rule's tolerance from its start pose (its position
    by 20 px or its angle by pi/9): moving the agent alone cannot succeed; else "agent"."""
    block = float(np.linalg.norm(np.asarray(goal_state[2:4]) - np.asarray(start_state[2:4])))
    ang = abs(float(goal_state[4] - start_state[4])) % (2 * math.pi)
    return "push" if block >= POS_TOL or min(ang, 2 * math.pi - ang) >= ANGLE_TOL else "agent"


class PushtSim:
    """gym-pusht with reset-to-state, rendering at the dataset's image size (one top-down camera)."""

    def __init__(self, size: int):
        self.env = make_env(size)

    def reset(self, state: np.ndarray) -> np.ndarray:
        obs, _ = self.env.reset(options={"reset_to_state": np.asarray(state, dtype=np.float64)})
        return obs["pixels"][None]

    def step(self, target_xy: np.ndarray, render: bool = True) -> np.ndarray:
        obs, *_ = self.env.step(np.clip(target_xy, 0.0, 512.0))  # gym-pusht renders in every step (cheap: 2D)
        return obs["pixels"][None]

    def state(self) -> np.ndarray:
        return env_state(self.env)

    def robot_state(self) -> np.ndarray:
        return self.state()[:2]

    def distances(self, goal_state: np.ndarray, state: np.ndarray) -> dict[str, float]:
        pos, ang = pusht_distances(goal_state, state)
        return {"pos_dist": pos, "angle_dist": ang,
                "agent_dist": float(np.linalg.norm(goal_state[:2] - state[:2])),
                "block_dist": float(np.linalg.norm(goal_state[2:4] - state[2:4]))}

    def success(self, goal_state: np.ndarray, state: np.ndarray) -> bool:
        """DINO-WM's PushT rule: agent + block positions within 20 px (norm over the four), angle within pi/9."""
        pos, ang = pusht_distances(goal_state, state)
        return pos < POS_TOL and ang < ANGLE_TOL

    def probe_targets(self, states_NS: np.ndarray) -> dict[str, np.ndarray]:
        return pusht_probe_targets(states_NS)

    def goal_group(self, start_state: np.ndarray, goal_state: np.ndarray) -> str:
        return pusht_goal_group(start_state, goal_state)

    def close(self) -> None:
        self.env.close()
