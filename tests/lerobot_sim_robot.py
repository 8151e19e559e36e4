"""Test helpers for `planner.serve`: Meta-World reach as a LeRobot robot (registered the way LeRobot registers
robots, so an unmodified `RobotClient` drives it), an analytic world model of its end effector, and a server
process entry point (spawned, so a test can kill it)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import torch
from lerobot.robots import RobotConfig

from planner.simrobot import SimulatedRobot
from trainer.actions import ActionSpace

KEYS = ["observation.images.exterior", "observation.images.wrist"]
STATE_NAMES = ("x.pos", "y.pos", "z.pos", "gripper.pos")
ACTION_NAMES = ("dx", "dy", "dz", "grip")
EEF_SCALE = 10.0  # latent units per metre
STEP_M = 0.04  # metres per unit action at 20 Hz (Meta-World's action scale at frame_skip 20)


@RobotConfig.register_subclass("wmctl_metaworld_reach")
@dataclasses.dataclass(kw_only=True)
class MetaworldReachConfig(RobotConfig):
    size: int = 64
    fps: int = 20
    variation: int = 0  # Meta-World's task variation the episode starts from


class MetaworldReach(SimulatedRobot):
    """Meta-World reach's Sawyer arm (`pipeline.sims.metaworld.MetaWorldSim`) as a robot: end-effector xyz and
    gripper opening as its joints, an exterior and a wrist camera, delta end-effector actions. The simulator advances
    only when an action is sent: with none the arm holds still, as a delta-controlled arm does. Created in the thread
    that first uses it (MuJoCo's EGL context belongs to one thread)."""

    config_class = MetaworldReachConfig
    name = "wmctl_metaworld_reach"

    def __init__(self, config: MetaworldReachConfig):
        super().__init__(config)
        self.config = config
        self.sim = None
        self.connected = False
        self.lock = threading.Lock()
        self.actions_sent = 0
        self.eef = None  # end-effector xyz after the last step (read by tests from other threads)
        self.last_action_time = None

    @property
    def observation_features(self) -> dict:
        cam = (self.config.size, self.config.size, 3)
        return {**dict.fromkeys(STATE_NAMES, float), "exterior": cam, "wrist": cam}

    @property
    def action_features(self) -> dict:
        return dict.fromkeys(ACTION_NAMES, float)

    def _ensure(self) -> None:
        if self.sim is None:
            from pipeline.sims.metaworld import MetaWorldSim

            self.sim = MetaWorldSim("reach", self.config.size, fps=self.config.fps, camera_keys=KEYS)
            self.images = self.sim.new_episode(self.config.variation)
            self.eef = self.sim.robot_state()[:3].copy()

    def get_observation(self) -> dict:
        with self.lock:
            self._ensure()
            state = self.sim.robot_state()
            return {**{k: float(v) for k, v in zip(STATE_NAMES, state)}, "exterior": self.images[0].copy(),
                    "wrist": self.images[1].copy()}

    def send_action(self, action: dict) -> dict:
        a = np.array([float(action[k]) for k in ACTION_NAMES])
        with self.lock:
            self._ensure()
            self.images = self.sim.step(a)
            self.eef = self.sim.robot_state()[:3].copy()
            self.actions_sent += 1
            self.last_action_time = time.monotonic()
        return action

    def disconnect(self) -> None:
        self.connected = False  # the simulator stays: tests read it after the client stopped

    def close_sim(self) -> None:
        """Close the simulator from another thread than its own (its EGL context may refuse: then it is dropped)."""
        with self.lock:
            sim, self.sim = self.sim, None
        if sim is not None:
            try:
                sim.close()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass

    def position(self) -> np.ndarray:
        with self.lock:
            return None if self.eef is None else self.eef.copy()


class ReachModel:
    """Meta-World's end effector as an analytic world model: two tokens, a constant 'patch' and the state token
    (end-effector xyz x EEF_SCALE, gripper); each step moves the end effector by STEP_M x the action's xyz."""

    encoder: dict = {}
    window = 4
    state_dim = 4
    actions = ActionSpace("absolute", 1, np.zeros(4), np.full(4, 0.4))  # planning bounds: +-1 per dimension
    dtype = torch.float32

    def planning_rollout(self, context_TNZ, *, context_actions_TA=None, k=4, seed=0):
        def rollout(actions_SHA, grad=False):
            S, H, _ = actions_SHA.shape
            state = context_TNZ[-1, 1].expand(S, 4)
            out = []
            for h in range(H):
                move = torch.cat([actions_SHA[:, h, :3] * STEP_M * EEF_SCALE, torch.zeros(S, 1)], dim=1)
                state = state + move
                out.append(torch.stack([torch.zeros(S, 4), state], dim=1))
            return torch.stack(out, dim=1)  # [S, H, 2, 4]

        return rollout


def encode_state(images: np.ndarray, state: np.ndarray) -> torch.Tensor:
    s = np.asarray(state, np.float64)
    return torch.tensor([[0.0] * 4, [s[0] * EEF_SCALE, s[1] * EEF_SCALE, s[2] * EEF_SCALE, s[3]]],
                        dtype=torch.float32)


# Meta-World's hand limits (SawyerXYZEnv hand_low / hand_high): the test's workspace box
WORKSPACE = ((-0.525, 0.348, -0.0525), (0.525, 1.025, 0.7))


def make_reach_server(goal, *, port: int = 0, deadline_s: float | None = None, obs_timeout_s: float = 2.0,
                      workspace=WORKSPACE, execute: int = 4, fps: float = 20.0, plan_ahead: bool = False):
    """A `PlanningServer` on the analytic reach model behind the safety guard, started (returns its handle)."""
    import functools

    from planner.cem import CEMConfig
    from planner.latent_mpc import LatentMPC, MPCConfig, load_goal
    from planner.safety import SafetyConfig, SafetyGuard
    from planner.serve import PlanningServer, ServeConfig, ServerHandle

    mpc = LatentMPC(ReachModel(), encode_state, MPCConfig(horizon=6, execute=execute, context=1,
                                                          cem=CEMConfig(samples=64, elites=8, iterations=3)), goal)
    safety = SafetyGuard(SafetyConfig(delta_scale=STEP_M, workspace_low=workspace[0], workspace_high=workspace[1],
                                      action_low=(-1.0,) * 4, action_high=(1.0,) * 4, deadline_s=deadline_s,
                                      obs_timeout_s=obs_timeout_s, max_chunk_travel=0.15))
    cfg = ServeConfig(port=port, fps=fps, obs_wait_s=0.2, plan_ahead=plan_ahead)
    server = PlanningServer(mpc, safety, cfg, cameras=KEYS,
                            goal_loader=functools.partial(load_goal, cameras=KEYS, size=64), run="reach-model")
    return ServerHandle(server, cfg)


def serve_in_process(goal_uri: str, port_queue) -> None:
    """Spawned server process: serve the analytic reach model towards the goal until killed."""
    import logging

    from planner.latent_mpc import GoalSpec, load_goal

    logging.basicConfig(level=logging.INFO, force=True)
    goal = load_goal(GoalSpec.from_uri(goal_uri), cameras=KEYS, size=64)
    handle = make_reach_server(goal)
    port_queue.put(handle.port)
    while True:
        time.sleep(1.0)
