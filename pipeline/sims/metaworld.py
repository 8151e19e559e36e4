"""Meta-World (MuJoCo) arm tasks behind the `Simulator` interface: a Sawyer arm commanded with delta end-effector
xyz + gripper, seen by a fixed exterior camera and a wrist camera.

- Rate: Meta-World steps the physics 5 x 2.5 ms per action (80 Hz). At `fps` F the env runs 400 / F physics
  steps per action and scales the action by the same factor (at 20 Hz: 20 steps, 4 cm per unit action), so one
  action per frame moves the arm as far per second as the native rate does.
- Cameras: `exterior` is Meta-World's `corner` camera, `wrist` its `gripperPOV`; both rendered with
  `mujoco.Renderer` (EGL, headless) with shadows, reflections and sites (the env's own goal marker) off, and
  turned 180 degrees (Meta-World's camera frames are upside down). These settings are `RENDER`, recorded with
  every generated dataset.
- State: `state()` is the full restorable state: the task's fields (its target, the object's, hand's and tool
  centre's initial positions, which the rewards and the goal marker read), then MuJoCo's
  `mjSTATE_INTEGRATION` state (time, qpos, qvel, activations, warm start, controls, applied forces, mocap pose,
  ...). Restoring it continues bit-exactly, also in another env instance; Meta-World's own `get_env_state`
  (qpos/qvel only) does not (the mocap target and warm start are missing).
- Robot state (`observation.state`): end-effector xyz (m) and the gripper opening (0..1).
- Success, against a goal *state* (the trial's replayed goal, not the env's own target): by default Meta-World's own
  rule (`success_rule="metaworld"`): the env's `evaluate_state` with its target set to the goal's position (reach:
  the goal's end effector; push: the goal's object), i.e. reach within 5 cm, push the object within 5 cm, the
  field's `info["success"]`. `success_rule="strict"` is the rule wmctl used before, stricter for push: also the end
  effector within 10 cm of the goal's (even the privileged scripted pusher seldom met it: docs/results.md,
  2026-12-01, "`make demo-arm`: Meta-World reach and push").
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Any

import numpy as np

from pipeline.stage import UserError

TASKS = ("reach", "push")
CAMERAS = {"exterior": "corner", "wrist": "gripperPOV"}  # camera role -> Meta-World camera name
CAMERA_KEY = "observation.images.{}"
RENDER = {"shadows": False, "reflections": False, "sites": False, "rotate_180": True, "backend": "egl"}
NATIVE_HZ_STEPS = 400  # 1 / 2.5 ms physics steps per second
NATIVE_FRAME_SKIP, NATIVE_ACTION_SCALE = 5, 0.01
EEF_TOL, OBJ_TOL, PUSH_EEF_TOL = 0.05, 0.05, 0.10
SUCCESS_RULES = ("metaworld", "strict")
# task fields saved ahead of the MuJoCo state (3 floats each). Not `init_left_pad` / `init_right_pad`: in Meta-World
# 3.1 they are live views of the physics (`get_body_com`), so they come back with the MuJoCo state.
TASK_FIELDS = ("_target_pos", "obj_init_pos", "hand_init_pos", "init_tcp")
EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri"


def require_egl() -> None:
    """Headless rendering: MUJOCO_GL=egl (unless the user chose another backend) and an EGL library present."""
    if "mujoco" in sys.modules and "MUJOCO_GL" not in os.environ:
        raise RuntimeError("MuJoCo was imported before MUJOCO_GL was set: create the simulator before importing it")
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
        if ctypes.util.find_library("EGL") is None:
            raise UserError("Meta-World renders headless through EGL, and no libEGL was found. On Debian/Ubuntu: "
                            f"`sudo apt-get install {EGL_PACKAGES}` (Mesa's CPU renderer is enough), or set "
                            "MUJOCO_GL=osmesa/glfw for another MuJoCo backend.")


def require_metaworld():
    require_egl()
    try:
        import metaworld
    except ImportError as e:
        raise UserError(f"the Meta-World simulator is not installed ({e}): `pip install -e '.[metaworld]'` "
                        "(metaworld and packaging)") from e
    return metaworld


def frame_skip_for(fps: int) -> int:
    """Physics steps per action at `fps`; refuses rates that are not a whole number of 2.5 ms steps."""
    if fps <= 0 or NATIVE_HZ_STEPS % fps:
        valid = [f for f in range(1, NATIVE_HZ_STEPS + 1) if NATIVE_HZ_STEPS % f == 0 and 5 <= f <= 80]
        raise UserError(f"--fps {fps}: Meta-World needs 400 / fps physics steps per action; valid rates: {valid}")
    return NATIVE_HZ_STEPS // fps


def env_name(task: str) -> str:
    if task not in TASKS:
        raise UserError(f"Meta-World task {task!r}: choose one of {TASKS}")
    return f"{task}-v3"


def make_env(task: str, fps: int, seed: int = 0):
    """A Meta-World v3 env for `task` at `fps` and the benchmark's task variations (ML1 train tasks, seeded)."""
    metaworld = require_metaworld()
    name = env_name(task)
    ml1 = metaworld.ML1(name, seed=seed)
    env = ml1.train_classes[name]()
    env.set_task(ml1.train_tasks[0])
    env.frame_skip = frame_skip_for(fps)
    env.action_scale = NATIVE_ACTION_SCALE * env.frame_skip / NATIVE_FRAME_SKIP
    env.max_path_length = 10**9  # episodes are ended by the caller
    return env, ml1.train_tasks


def scripted_policy(task: str):
    """Meta-World's shipped scripted policy for `task` (it reads the goal from the observation's last 3 values)."""
    from metaworld.policies import SawyerPushV3Policy, SawyerReachV3Policy

    return {"reach": SawyerReachV3Policy, "push": SawyerPushV3Policy}[task]()


class MetaWorldSim:
    """A Meta-World task with full-state reset, two cameras and goal-state success (see the module doc)."""

    def __init__(self, task: str, size: int, fps: int = 20, camera_keys: list[str] | None = None, seed: int = 0,
                 success_rule: str = "metaworld"):
        if success_rule not in SUCCESS_RULES:
            raise UserError(f"--success-rule {success_rule!r}: choose one of {SUCCESS_RULES}")
        require_egl()  # before MuJoCo is imported: it picks its GL backend then
        import mujoco

        self.task, self.size, self.fps, self.success_rule = task, size, fps, success_rule
        self.env, self.tasks = make_env(task, fps, seed)
        self.env.reset()
        roles = {CAMERA_KEY.format(r): r for r in CAMERAS}
        keys = camera_keys or list(roles)
        unknown = [k for k in keys if k not in roles]
        if unknown:
            raise UserError(f"camera keys {unknown} are not Meta-World cameras; this simulator renders {list(roles)}")
        self.cameras = [CAMERAS[roles[k]] for k in keys]
        try:
            self.renderer = mujoco.Renderer(self.env.model, size, size)
        except Exception as e:  # noqa: BLE001 - any backend failure gets the same advice
            raise UserError(f"MuJoCo could not open an offscreen {os.environ.get('MUJOCO_GL')} context ({e}). "
                            f"Install {EGL_PACKAGES} (Debian/Ubuntu) or choose another MUJOCO_GL backend.") from e
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = RENDER["shadows"]
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = RENDER["reflections"]
        self.option = mujoco.MjvOption()
        self.option.sitegroup[:] = int(RENDER["sites"])
        self._spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self._mj_size = mujoco.mj_stateSize(self.env.model, self._spec)
        self._mujoco = mujoco
        self.policy = scripted_policy(task)  # stateless: one for every action

    # ------------------------------------------------------------------ episodes (data generation)
    def new_episode(self, variation: int) -> np.ndarray:
        """Reset to one of the benchmark's task variations (object and target positions); returns the images."""
        self.env.set_task(self.tasks[variation % len(self.tasks)])
        self.env.reset()
        return self.render()

    def scripted_action(self, goal: np.ndarray | None = None) -> np.ndarray:
        """The shipped scripted policy's action now, towards the env's own target or `goal` (reach: an end-
        effector position; push: an object position)."""
        curr = self.env._get_curr_obs_combined_no_goal()
        target = self.env._target_pos if goal is None else goal
        obs = np.hstack([curr, np.zeros_like(curr), target])
        return np.clip(self.policy.get_action(obs), -1.0, 1.0)

    # ------------------------------------------------------------------ Simulator interface
    def render(self) -> np.ndarray:
        out = []
        for cam in self.cameras:
            self.renderer.update_scene(self.env.data, camera=cam, scene_option=self.option)
            img = self.renderer.render()
            out.append(img[::-1, ::-1] if RENDER["rotate_180"] else img)
        return np.ascontiguousarray(np.stack(out))

    def reset(self, state: np.ndarray) -> np.ndarray:
        self.reset_physics_only(state)
        self.env.model.site("goal").pos = self.env._target_pos
        self.env.curr_path_length = 0
        return self.render()

    def step(self, action: np.ndarray, render: bool = True) -> np.ndarray | None:
        self.env.step(np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0))
        return self.render() if render else None  # a render costs far more than the physics step (docs/results.md)

    def state(self) -> np.ndarray:
        mj = np.empty(self._mj_size)
        self._mujoco.mj_getState(self.env.model, self.env.data, mj, self._spec)
        fields = [np.asarray(getattr(self.env, name), dtype=np.float64).reshape(3) for name in TASK_FIELDS]
        return np.concatenate([*fields, mj])

    def robot_state(self) -> np.ndarray:
        return self.env._get_curr_obs_combined_no_goal()[:4].astype(np.float64)  # eef xyz, gripper opening

    def _positions(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(end effector xyz, object xyz) of a saved state: restored, read, and the current state put back."""
        saved = self.state()
        self.reset_physics_only(state)
        eef, obj = self.env.tcp_center.copy(), self.env._get_pos_objects()[:3].copy()
        self.reset_physics_only(saved)
        return eef, obj

    def reset_physics_only(self, state: np.ndarray) -> None:
        """Restore a saved state (task fields + MuJoCo state) without rendering."""
        state = np.asarray(state, dtype=np.float64)
        n = 3 * len(TASK_FIELDS)
        if len(state) != n + self._mj_size:
            raise UserError(f"a Meta-World {self.task} state has {n + self._mj_size} values, got {len(state)}: "
                            "the dataset was recorded in another simulator or task (check --env)")
        for i, name in enumerate(TASK_FIELDS):
            setattr(self.env, name, state[3 * i:3 * i + 3].copy())
        mj = state[n:]
        self._mujoco.mj_setState(self.env.model, self.env.data, mj, self._spec)
        self._mujoco.mj_forward(self.env.model, self.env.data)  # positions for rendering and the observation
        self._mujoco.mj_setState(self.env.model, self.env.data, mj, self._spec)  # forward rewrote the warm start

    def distances(self, goal_state: np.ndarray, state: np.ndarray) -> dict[str, float]:
        geef, gobj = self._positions(goal_state)
        eef, obj = self._positions(state)
        d = {"eef_dist": float(np.linalg.norm(geef - eef)), "obj_dist": float(np.linalg.norm(gobj - obj))}
        return d if self.task == "reach" else {"obj_dist": d["obj_dist"], "eef_dist": d["eef_dist"]}

    def success(self, goal_state: np.ndarray, state: np.ndarray) -> bool:
        if self.success_rule == "metaworld":
            return self.own_success(goal_state, state)
        d = self.distances(goal_state, state)
        if self.task == "reach":
            return d["eef_dist"] <= EEF_TOL
        return d["obj_dist"] <= OBJ_TOL and d["eef_dist"] <= PUSH_EEF_TOL

    def own_success(self, goal_state: np.ndarray, state: np.ndarray) -> bool:
        """Meta-World's `info["success"]` at `state`, its target set to the goal's position (reach: the goal's end
        effector; push: the goal's object); the current state and target are put back."""
        geef, gobj = self._positions(goal_state)
        saved = self.state()
        try:
            self.reset_physics_only(state)
            self.env._target_pos = (geef if self.task == "reach" else gobj).copy()
            obs = self.env._get_obs()
            _, info = self.env.evaluate_state(obs, np.zeros(self.env.action_space.shape, dtype=np.float32))
        finally:
            self.reset_physics_only(saved)
        return bool(info["success"])

    def probe_targets(self, states_NS: np.ndarray) -> dict[str, np.ndarray]:
        """End-effector and object xyz of each recorded state (restored one by one)."""
        pos = np.array([np.concatenate(self._positions(np.asarray(s, dtype=np.float64))) for s in states_NS])
        return {f"{what}_{c}": pos[:, 3 * k + i] for k, what in enumerate(("eef", "obj")) for i, c in enumerate("xyz")}

    def goal_group(self, start_state: np.ndarray, goal_state: np.ndarray) -> str:
        """push: "push" when the puck's goal is beyond the tolerance from its start; reach: always "agent"."""
        if self.task != "push":
            return "agent"
        return "push" if self.distances(goal_state, start_state)["obj_dist"] > OBJ_TOL else "agent"

    def trial_ok(self, start_state: np.ndarray, goal_state: np.ndarray) -> bool:
        """A trial worth running: reach, the end effector's goal more than twice the tolerance away (neither standing
        still nor one lucky step solves it); push, the puck's goal farther than the tolerance (it must be pushed)."""
        d = self.distances(goal_state, start_state)
        if self.task == "push":
            return d["obj_dist"] > OBJ_TOL
        return d["eef_dist"] > 2 * EEF_TOL

    def oracle_action(self, goal_state: np.ndarray) -> np.ndarray:
        """The scripted policy driven towards the goal state with privileged simulator state (the upper bound):
        reach, towards the goal's end-effector position; push, the goal's object position."""
        geef, gobj = self._positions(goal_state)
        return self.scripted_action(geef if self.task == "reach" else gobj)

    def describe(self) -> dict[str, Any]:
        return {"simulator": "metaworld", "task": self.task, "fps": self.fps, "size": self.size,
                "success_rule": self.success_rule,
                "frame_skip": self.env.frame_skip, "action_scale": self.env.action_scale,
                "cameras": self.cameras, "render": RENDER}

    def close(self) -> None:
        self.renderer.close()
        self.env.close()
