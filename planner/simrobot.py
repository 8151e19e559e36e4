"""`wmctl plan sim --serve-fps F`: the model's trials through the deployed path, `wmctl robot serve` and LeRobot's
unmodified async-inference `RobotClient`, with the simulator as the robot.

The synchronous loop of `planner.sim` plans, then executes, then plans: the robot waits for every plan. Served, the
robot runs at its own control rate (`fps`) and the server plans the next chunk while the robot executes the current
one (LeRobot's async inference: the client sends an observation when its queue falls to `chunk_size_threshold` of a
chunk; the server plans from it alone and answers actions for the timesteps after it; the client drops those it has
passed and, with `latest_only`, replaces its queue). Where planning is slower than a chunk's execution the queue runs
dry and the control loop's ticks pass with no action: the trial's rate (env steps / loop seconds) is then the
robot's sustained action rate, the figure a deployment needs.

One server process (`python -m pipeline.cli robot serve --ckpt ... --no-safety`, the command a user runs) serves
every trial; each trial is one client session: `Ready` resets the server's session, the policy instructions carry
the trial's goal (`wmctl-goal:` URI, its goal images as PNG files and its robot state), then the client streams
observations and executes chunks. The trial ends, as in the synchronous loop, when the simulator's success rule holds
at a check (every `execute` x frameskip env steps, where the synchronous loop checks) or after `max_steps` env steps.
What differs from the synchronous loop, by design of the protocol: the server plans from the latest observation
alone (context 1), and actions execute on an observation up to a plan's latency old.

The robot class is found by LeRobot's `make_device_from_device_class` from its config's module and name (module
`simrobot`, classes `SimRobotConfig` / `SimRobot`); the simulator it drives is handed over in-process
(`SESSIONS`), created by the thread that runs the client's control loop (MuJoCo's EGL context belongs to one thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import socket
import subprocess  # nosec: runs this package's own CLI with arguments built here
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from lerobot.robots import Robot, RobotConfig

from pipeline.stage import UserError

log = logging.getLogger(__name__)

IMAGE_PREFIX = "observation.images."
SESSIONS: dict[str, SimSession] = {}  # the trial each SimRobot drives, by its config's `session`


class SimSession:
    """One trial's robot side: the simulator at the start state, the goal to judge, the step budget. `act` steps
    the simulator (no render: `observe` renders what the client asks for), counts the env steps and checks the
    goal where the synchronous loop would; `done` is set when the trial is over."""

    def __init__(self, sim, start_images: np.ndarray, goal_state: np.ndarray, *, max_steps: int, check_every: int):
        self.sim, self.goal_state = sim, goal_state
        self.max_steps, self.check_every = max_steps, check_every
        self.images: np.ndarray | None = start_images  # None: stepped since the last render
        self.steps, self.success = 0, False
        self.actions: list[np.ndarray] = []
        self.frames: list[np.ndarray] = [start_images]  # what the server was sent, in order
        self.done = threading.Event()
        self.t_end: float | None = None
        self.lock = threading.Lock()

    def observe(self) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if self.images is None:
                self.images = self.sim.render()
                self.frames.append(self.images)
            return self.images, np.asarray(self.sim.robot_state(), np.float64)

    def act(self, action: np.ndarray) -> None:
        with self.lock:
            if self.done.is_set():
                return  # the trial is over: later actions are not executed
            out = self.sim.step(action, render=False)
            self.images = out  # a simulator that renders anyway returns its images
            if out is not None:
                self.frames.append(out)
            self.steps += 1
            self.actions.append(np.asarray(action, np.float64))
            end = self.steps >= self.max_steps
            if end or self.steps % self.check_every == 0:
                self.success = bool(self.sim.success(self.goal_state, self.sim.state()))
            if end or self.success:
                self.t_end = time.perf_counter()
                self.done.set()


@RobotConfig.register_subclass("wmctl_sim")
@dataclasses.dataclass(kw_only=True)
class SimRobotConfig(RobotConfig):
    session: str = ""  # key of the `SimSession` in `SESSIONS`
    camera_keys: tuple[str, ...] = ()  # the run's camera keys (observation.images.*; `cameras` is LeRobot's)
    size: int = 96
    state_dim: int = 0
    action_dim: int = 0


class SimulatedRobot(Robot):
    """What a simulator needs of LeRobot's `Robot` besides its features, observations and actions: connecting is a
    flag; there is nothing to calibrate or configure."""

    connected = False

    @property
    def is_connected(self) -> bool:
        return self.connected

    def connect(self, calibrate: bool = True) -> None:
        self.connected = True

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def disconnect(self) -> None:
        self.connected = False


class SimRobot(SimulatedRobot):
    """A `plan sim` simulator as a LeRobot robot: the run's cameras, `observation.state` as s0..s{n-1}, the env
    action as a0..a{d-1}. With no action sent the simulator does not advance (a delta-controlled arm holds)."""

    config_class = SimRobotConfig
    name = "wmctl_sim"

    def __init__(self, config: SimRobotConfig):
        super().__init__(config)
        self.config, self.session = config, SESSIONS[config.session]

    @property
    def observation_features(self) -> dict:
        cam = (self.config.size, self.config.size, 3)
        return {**{f"s{i}": float for i in range(self.config.state_dim)},
                **{c.removeprefix(IMAGE_PREFIX): cam for c in self.config.camera_keys}}

    @property
    def action_features(self) -> dict:
        return {f"a{i}": float for i in range(self.config.action_dim)}

    def get_observation(self) -> dict:
        images, state = self.session.observe()
        return {**{f"s{i}": float(v) for i, v in enumerate(state)},
                **{c.removeprefix(IMAGE_PREFIX): img for c, img in zip(self.config.camera_keys, images)}}

    def send_action(self, action: dict) -> dict:
        self.session.act(np.array([float(action[f"a{i}"]) for i in range(self.config.action_dim)]))
        return action


def _die_with_parent() -> None:
    """In the server's process before it runs: SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG), so a
    `plan sim` killed with SIGKILL leaves no server behind; elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_client(log_file: Path):
    """LeRobot's RobotClient module. Importing it writes a log file into ./logs (the caller's folder) and
    reconfigures the root logger: the configuration is put back, and the client's logger (an INFO line per session,
    an ERROR per session stopped with a call in flight) writes to `log_file` instead of the console."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from lerobot.async_inference import robot_client
    finally:
        root.handlers[:], root.level = handlers, level
    client_log = logging.getLogger("robot_client")
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_file for h in client_log.handlers):
        client_log.handlers[:] = [logging.FileHandler(log_file)]
        client_log.propagate = False
    return robot_client


@dataclasses.dataclass(frozen=True)
class ServedSettings:
    fps: int  # the robot's control rate (LeRobot's client takes whole Hz)
    threshold: float = 0.5  # the client's chunk_size_threshold (LeRobot's default)
    plan_ahead: bool = False  # the server's --plan-ahead


class ServedLoop:
    """The server process and the per-trial client sessions. `start(goal_images, goal_robot)` once (the server
    needs a goal to start with), `trial(...)` per trial, `stop()` returns the server's report."""

    def __init__(self, ckpt: Path, cfg, settings: ServedSettings, *, cameras: list[str], size: int,
                 state_dim: int, action_dim: int, frameskip: int, workdir: Path):
        self.ckpt, self.cfg, self.settings = Path(ckpt), cfg, settings
        self.cameras, self.size, self.state_dim, self.action_dim = list(cameras), size, state_dim, action_dim
        self.frameskip, self.workdir = frameskip, Path(workdir).resolve()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.count = 0
        if not all(c.startswith(IMAGE_PREFIX) for c in self.cameras):
            raise UserError(f"--serve-fps: the run's cameras {self.cameras} are not all {IMAGE_PREFIX}*; a LeRobot "
                            "robot can only send cameras under that prefix")

    def _goal(self, images: np.ndarray, robot: np.ndarray, name: str):
        from PIL import Image

        from planner.latent_mpc import GoalSpec

        folder = self.workdir / "serve-goals"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for c, img in zip(self.cameras, images):
            files.append(folder / f"{name}-{c.removeprefix(IMAGE_PREFIX)}.png")
            Image.fromarray(np.ascontiguousarray(img)).save(files[-1])
        return GoalSpec(images=tuple(files), state=tuple(float(x) for x in robot))

    def start(self, goal_images: np.ndarray, goal_robot: np.ndarray) -> None:
        import grpc

        cfg, cem = self.cfg, self.cfg.cem
        spec = self._goal(goal_images, goal_robot, "start")
        self.port = _free_port()
        same = [f"mpc.{k}={getattr(cfg, k)}" for k in ("state_weight", "cost_frames", "execute_plan",
                                                          "max_delta_fraction")]
        same += [f"mpc.cem.{k}={getattr(cem, k)}" for k in ("init_std", "min_std", "momentum", "noise_beta",
                                                             "keep_elites")]
        same += [f"mpc.gd.{f.name}={getattr(cfg.gd, f.name)}" for f in dataclasses.fields(cfg.gd)]
        cmd = [sys.executable, "-m", "pipeline.cli", "robot", "serve", "--ckpt", str(self.ckpt),
               "--port", str(self.port), "--fps", str(self.settings.fps), "--horizon", str(cfg.horizon),
               "--execute", str(cfg.execute), "--planner", cfg.planner, "--samples", str(cem.samples),
               "--elites", str(cem.elites), "--iterations", str(cem.iterations), "--k", str(cfg.k),
               "--seed", str(cfg.seed), "--device", cfg.device, "--no-safety",
               *(["--plan-ahead"] if self.settings.plan_ahead else []),
               *[a for p in spec.images for a in ("--goal-image", str(p))],
               "--goal-state", ",".join(repr(x) for x in spec.state), *[a for x in same for a in ("--set", x)]]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.workdir / "serve.log"
        log.info("starting the server: %s (its log: %s)", " ".join(cmd), self.log_file)
        with open(self.log_file, "ab") as err:  # the server dies with this process, even if it is killed
            err.write(f"$ {' '.join(cmd)}\n".encode())
            err.flush()
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,  # nosec: our own CLI
                                         preexec_fn=_die_with_parent)
        with contextlib.chdir(self.workdir):  # LeRobot's client module writes ./logs when imported
            self.client_module = _import_client(self.workdir / "client.log")
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        try:
            deadline = time.monotonic() + 300
            while True:
                if self.proc.poll() is not None:
                    raise UserError(f"wmctl robot serve exited with {self.proc.returncode} before serving: see "
                                    f"{self.log_file}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=1.0)
                    break
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise UserError(f"wmctl robot serve did not listen within 300 s: see {self.log_file}") from None
        finally:
            channel.close()

    def trial(self, sim, start_images: np.ndarray, start_state: np.ndarray, goal_images: np.ndarray,
              goal_robot: np.ndarray, goal_state: np.ndarray) -> dict[str, Any]:
        """One trial through the server, the simulator at its start state: the outcome as `planner.sim.run_trial`
        gives it (plan latencies are the server's: `stop()`'s report)."""
        from lerobot.async_inference.configs import RobotClientConfig

        self.count += 1
        key = f"trial-{self.count}"
        per_chunk = self.cfg.execute * self.frameskip
        session = SimSession(sim, start_images, goal_state, max_steps=self.cfg.max_steps, check_every=per_chunk)
        SESSIONS[key] = session
        goal = self._goal(goal_images, goal_robot, "trial")
        client = None
        try:
            client = self.client_module.RobotClient(RobotClientConfig(
                policy_type="wmctl", pretrained_name_or_path=goal.to_uri(), actions_per_chunk=per_chunk,
                fps=self.settings.fps,
                robot=SimRobotConfig(id="sim", calibration_dir=self.workdir / "serve-calibration", session=key,
                                     camera_keys=tuple(self.cameras), size=self.size, state_dim=self.state_dim,
                                     action_dim=self.action_dim),
                server_address=f"127.0.0.1:{self.port}", chunk_size_threshold=self.settings.threshold,
                aggregate_fn_name="latest_only"))
            if not client.start():
                raise UserError(f"the RobotClient could not connect to the server: see {self.log_file}")
            receiver = threading.Thread(target=client.receive_actions, daemon=True)
            receiver.start()
            limit = 30.0 + 10.0 * self.cfg.max_steps / self.settings.fps
            watcher = threading.Thread(target=self._end_when_done, args=(client, session, limit), daemon=True)
            t0 = time.perf_counter()
            watcher.start()
            with _end_on_sigterm(session) as terminated:
                client.control_loop(task="")  # this thread: the simulator stays with the thread that made it
                watcher.join()
                receiver.join(10)
        finally:
            SESSIONS.pop(key, None)
            if client is not None and client.running:
                client.stop()
        if terminated:
            signal.raise_signal(signal.SIGTERM)  # now outside LeRobot's loop: the caller's handler stops the run
        t_end = session.t_end or time.perf_counter()
        fs = self.frameskip  # smoothness per model frame, as the synchronous loop measures it
        acts = np.stack(session.actions)[: len(session.actions) // fs * fs] if session.actions else np.zeros((0, 1))
        frames = acts.reshape(len(acts) // fs, -1) if len(acts) else acts
        steps = np.diff(frames, axis=0) if len(frames) > 1 else np.zeros((1, 1))
        start, final = sim.distances(goal_state, start_state), sim.distances(goal_state, sim.state())
        return {"success": session.success, "steps": session.steps,
                **{f"final_{k}": v for k, v in final.items()}, **{f"start_{k}": v for k, v in start.items()},
                "smoothness": float(np.linalg.norm(steps, axis=1).mean()), "latencies": [], "loop_s": t_end - t0,
                "frames": session.frames, "goal": goal_images}

    @staticmethod
    def _end_when_done(client, session: SimSession, limit: float) -> None:
        if not session.done.wait(limit):
            log.warning("served trial did not end within %.0f s (%d env steps done): stopping it", limit,
                        session.steps)
            session.t_end = time.perf_counter()
            session.done.set()
        client.stop()

    def describe(self, report: dict[str, Any] | None) -> dict[str, Any]:
        """What sim.json keeps of a served run: the robot's rate, the client's threshold, the server's context (the
        latest observation alone) and its report, over the model trials this process ran (after a resume, only
        those)."""
        return {**dataclasses.asdict(self.settings), "context": 1, "trials_in_report": self.count, "server": report}

    def stop(self) -> dict[str, Any] | None:
        """Stop the server (SIGTERM: it prints its report); the report, or None where it gave none."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for line in reversed(out.decode(errors="replace").splitlines()):
            with contextlib.suppress(json.JSONDecodeError):
                report = json.loads(line)
                if isinstance(report, dict):
                    return report
        log.warning("the server gave no report (exit %s): see %s", proc.returncode, self.log_file)
        return None


@contextlib.contextmanager
def _end_on_sigterm(session: SimSession):
    """While LeRobot's control loop runs in this thread (it catches `Exception`, so the caller's SIGTERM handler
    raising there would only be logged): SIGTERM ends the trial; yields a list that is non-empty if it came."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def on_term(signum, frame) -> None:
        came.append(signum)
        session.done.set()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield came
    finally:
        signal.signal(signal.SIGTERM, old)


def served_loop(wm, cfg, source, sim) -> ServedLoop:
    """The server process and client sessions of `plan sim --serve-fps` (the server starts at the first model
    trial): `planner.sim.run_plan_sim`'s `serve`. The server gets the planning settings of `cfg`; the served loop
    has no image shift and no expected cost over noise draws (refused)."""
    if getattr(wm, "checkpoint", None) is None:
        raise UserError("--serve-fps serves a trained checkpoint: plan with a run (--run/--ckpt)")
    if cfg.shift != "none" or cfg.noise_draws != 1:
        raise UserError(f"--serve-fps with --shift {cfg.shift} / --noise-draws {cfg.noise_draws}: the served loop "
                        "plans on the robot's images as they are, on one noise draw; drop those options")
    workdir = Path(cfg.out) if cfg.out is not None else Path(wm.checkpoint) / "plans" / "served"
    settings = ServedSettings(cfg.serve_fps, cfg.serve_threshold, cfg.serve_plan_ahead)
    return ServedLoop(Path(wm.checkpoint), cfg, settings, cameras=source.cameras, size=source.size,
                      state_dim=len(sim.robot_state()), action_dim=wm.actions.step_dim,
                      frameskip=wm.actions.frameskip, workdir=workdir)
