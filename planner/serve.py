"""`serve`: wmctl's latent MPC behind LeRobot's async-inference protocol, for an unmodified `RobotClient`.

LeRobot's async inference is a gRPC service (`lerobot.transport.services_pb2_grpc.AsyncInference`: `Ready`,
`SendPolicyInstructions` with a pickled `RemotePolicyConfig`, `SendObservations` streaming pickled `TimedObservation`s
in 2 MB chunks, `GetActions` answering a pickled list of `TimedAction`s). LeRobot's `PolicyServer` loads only its
hard-coded policy types; its client only needs a non-empty `policy_type`, so this server speaks the same service for
`--policy_type=wmctl`. Its `pretrained_name_or_path` names the run served, or is a goal (`wmctl-goal:{json}`,
`GoalSpec.to_uri`): the protocol has no goal slot, so the goal is set at start, replaced by `PlanningServer.set_goal`,
or sent that way. Only the latest observation is planned on (one replaced while waiting is counted as dropped; one at
a timestep the last plan started from is skipped unless the client's queue is empty or that plan's chunk has had the
time to run). `GetActions` plans from it (context: it alone), warm-started from the previous plan shifted by the model
frames executed since (from the timesteps), and answers actions for timesteps t+1, t+2, ... (the client drops those it
passed while the plan ran and executes the rest while the next chunk is planned). Every chunk passes
`planner.safety.SafetyGuard`; a missed deadline, a failed plan or `obs_timeout_s` without observations make a hold
chunk instead (exact with the client's `aggregate_fn_name=latest_only`; other aggregates blend it with the queue).
Latency, clamps and holds are logged per chunk; `report()` sums up. A `relative_to_state` model's chunk is converted
to robot actions with the observed state for all its steps.

Security: the payloads are Python pickles, and unpickling attacker-controlled bytes can run arbitrary code. This
server unpickles with an allow-list (`safe_loads`: LeRobot's two payload classes, numpy arrays, plain values;
anything else is refused before it is built) and caps payload sizes, but it still parses untrusted input and reads
goal files named by clients. It binds to loopback (127.0.0.1) unless told otherwise and refuses any other address
without `allow_remote=True`: expose it only on a network you trust, or tunnel (ssh -L).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import ipaddress
import logging
import pickle  # nosec: restricted by `_RestrictedUnpickler`
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from lerobot.async_inference.helpers import RemotePolicyConfig, TimedAction, TimedObservation
from lerobot.transport import services_pb2, services_pb2_grpc
from lerobot.utils.feature_utils import build_dataset_frame

from pipeline.stage import UserError
from planner.latent_mpc import GOAL_URI, Goal, GoalSpec, LatentMPC, MPCConfig, load_goal, load_planning
from planner.safety import SafetyConfig, SafetyGuard

log = logging.getLogger(__name__)

POLICY_TYPE = "wmctl"
PICKLE_RISK = ("the protocol's payloads are pickles (unpickling untrusted bytes can run code; this server allows "
               "only LeRobot's payload classes and numpy arrays, but still parses what any peer sends)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback only unless `allow_remote`
    port: int = 8080  # 0: any free port
    allow_remote: bool = False  # bind to a non-loopback address (see the module doc: pickled payloads)
    fps: float = 10.0  # the robot's control rate: a chunk's action timestamps are 1/fps apart
    chunk_frames: int | None = None  # model frames sent per chunk (None: the MPC's `execute`)
    plan_ahead: bool = False  # plan from the predicted state after the actions that run while the plan is computed
    obs_wait_s: float = 0.5  # how long GetActions waits for an observation before answering empty
    max_payload_mb: float = 32.0  # larger observations or instructions are refused
    workers: int = 4

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.obs_wait_s <= 0 or self.max_payload_mb <= 0 or not 0 <= self.port <= 65535:
            raise UserError("--fps, --obs-wait and --max-payload-mb must be positive and --port in 0..65535")
        check_bind(self.host, self.allow_remote)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    if not (is_loopback(host) or allow_remote):
        raise UserError(f"--host {host}: serving beyond this machine exposes it to anyone who can reach the port, "
                        f"and {PICKLE_RISK}; bind 127.0.0.1 (and tunnel, e.g. ssh -L), or pass --allow-remote on a "
                        "network you trust")


class PayloadError(ValueError):
    """A payload refused: not a pickle, a class outside the allow-list, the wrong type, too large."""


_ALLOWED = {("lerobot.async_inference.helpers", "TimedObservation"),
            ("lerobot.async_inference.helpers", "RemotePolicyConfig"),
            ("numpy", "ndarray"), ("numpy", "dtype")} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | {
    (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise PayloadError(f"refused a pickled {module}.{name}: only LeRobot's payloads and numpy arrays")
        return super().find_class(module, name)


def safe_loads(data: bytes, expected: type, *, max_bytes: int) -> Any:
    """Unpickle `data` with the allow-list and check it is an `expected`; PayloadError otherwise."""
    if len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a malformed payload
        raise PayloadError(f"not a valid pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, expected):
        raise PayloadError(f"expected a {expected.__name__}, got a {type(obj).__name__}")
    return obj


def _receive(request_iterator, max_bytes: int) -> bytes:
    """The bytes of one chunked message (lerobot.transport.utils.send_bytes_in_chunks), size-capped."""
    buf = bytearray()
    for item in request_iterator:
        if item.transfer_state == services_pb2.TRANSFER_BEGIN:
            buf = bytearray(item.data)
        elif item.transfer_state in (services_pb2.TRANSFER_MIDDLE, services_pb2.TRANSFER_END):
            buf += item.data
        else:
            raise PayloadError(f"unknown transfer state {item.transfer_state}")
        if len(buf) > max_bytes:
            raise PayloadError(f"payload over the {max_bytes}-byte limit")
        if item.transfer_state == services_pb2.TRANSFER_END:
            return bytes(buf)
    raise PayloadError("the stream ended before its last chunk")


class PlanningServer(services_pb2_grpc.AsyncInferenceServicer):
    """LeRobot's AsyncInference service planning with `mpc` behind `safety`; `cameras`: the run's, in its order;
    `goal_loader` turns a `GoalSpec` into a `Goal` (for goals sent by clients); `run`: the run served."""

    def __init__(self, mpc: LatentMPC, safety: SafetyGuard, cfg: ServeConfig, *, cameras: list[str],
                 goal_loader: Callable[[GoalSpec], Goal] | None = None, run: str | None = None):
        self.mpc, self.safety, self.cfg, self.cameras = mpc, safety, cfg, list(cameras)
        self.goal_loader, self.run = goal_loader, run
        self.max_bytes = int(cfg.max_payload_mb * 2**20)
        self._cond, self._plan_lock = threading.Condition(), threading.Lock()
        self.stats = {"observations": 0, "dropped_stale": 0, "skipped_planned": 0, "refused": 0, "chunks": 0,
                      "holds": 0}
        self.latencies: list[float] = []
        self._features, self._rename, self._per_chunk = None, {}, None  # from the policy instructions
        self._reset_session()

    def _reset_session(self) -> None:
        """A new client session. An in-flight plan of the client that left is waited for (it books its chunk under
        the plan lock), so nothing of it reaches the new session."""
        with self._plan_lock, self._cond:
            self._pending: TimedObservation | None = None
            self._last_obs_time: float | None = None
            self._last_state: np.ndarray | None = None
            self._last_plan_t: int | None = None  # the observation timestep the last plan started from
            self._plan_start: int | None = None  # the timestep the last plan's first action follows
            self._last_chunk_at, self._last_chunk_len = 0.0, 0  # when the last chunk was answered, its actions
            self._last_hold = 0.0
            self._sent: dict[int, np.ndarray] = {}
            self.mpc.reset()

    # ------------------------------------------------------------------ the user's side
    def set_goal(self, goal: Goal | GoalSpec) -> None:
        """Replace the goal (a `Goal`, or a `GoalSpec` loaded by `goal_loader`); the next plan starts afresh."""
        if isinstance(goal, GoalSpec):
            if self.goal_loader is None:
                raise UserError("this server was started without a goal loader: pass a Goal")
            goal = self.goal_loader(goal)
        with self._plan_lock:
            self.mpc.set_goal(goal)
            self._last_plan_t = self._plan_start = None  # an observation planned before is worth a plan now
        log.info("goal replaced")

    def report(self) -> dict[str, Any]:
        lat = self.latencies
        return {**self.stats, "plans": len(lat), "safety": self.safety.snapshot(),
                "latency_s": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                              "max": float(max(lat))} if lat else None}

    def _refuse(self, context, msg: str, code=grpc.StatusCode.INVALID_ARGUMENT) -> None:
        """Count, log and abort the call (raises): the server goes on serving."""
        self.stats["refused"] += 1
        log.warning("refused a request from %s: %s", context.peer(), msg)
        context.abort(code, msg)

    # ------------------------------------------------------------------ the protocol
    def Ready(self, request, context):  # noqa: N802
        log.info("client %s connected", context.peer())
        self._reset_session()
        return services_pb2.Empty()

    def SendPolicyInstructions(self, request, context):  # noqa: N802
        try:
            spec = safe_loads(request.data, RemotePolicyConfig, max_bytes=self.max_bytes)
            self._apply_instructions(spec)
        except (PayloadError, UserError) as e:
            self._refuse(context, f"policy instructions: {e}")
        return services_pb2.Empty()

    def _apply_instructions(self, spec: RemotePolicyConfig) -> None:
        if spec.policy_type != POLICY_TYPE:
            raise UserError(f"policy_type {spec.policy_type!r}: this server plans with wmctl; pass "
                            f"--policy_type={POLICY_TYPE}")
        if not isinstance(spec.lerobot_features, dict) or not isinstance(spec.rename_map, dict):
            raise PayloadError("lerobot_features and rename_map must be dicts")
        path = str(spec.pretrained_name_or_path)
        if path.startswith(GOAL_URI):
            self.set_goal(GoalSpec.from_uri(path))
        elif self.run and path not in (POLICY_TYPE, self.run) and Path(path).resolve() != Path(self.run).resolve():
            raise UserError(f"pretrained_name_or_path {path!r}: this server serves {self.run}; pass that, "
                            f"'{POLICY_TYPE}', or a goal ({GOAL_URI}{{...}})")
        keys = {spec.rename_map.get(k, k) for k in spec.lerobot_features}
        missing = [c for c in self.cameras if c not in keys]
        if missing:
            raise UserError(f"the robot sends {sorted(keys)}, not the run's cameras {missing}: name the robot's "
                            "cameras as the dataset did, or map them with the client's rename_map")
        self._features, self._rename = spec.lerobot_features, dict(spec.rename_map)
        self._per_chunk = int(spec.actions_per_chunk) if int(spec.actions_per_chunk) > 0 else None
        log.info("policy instructions: %s, %s actions per chunk, features %s", path[:80], self._per_chunk,
                 sorted(keys))

    def SendObservations(self, request_iterator, context):  # noqa: N802
        try:
            obs = safe_loads(_receive(request_iterator, self.max_bytes), TimedObservation, max_bytes=self.max_bytes)
            if not isinstance(obs.observation, dict) or not isinstance(obs.timestep, int):
                raise PayloadError("a TimedObservation needs a dict observation and an int timestep")
        except PayloadError as e:
            self._refuse(context, f"observation: {e}")
        with self._cond:
            self.stats["observations"] += 1
            if self._pending is not None:
                self.stats["dropped_stale"] += 1  # superseded before it was planned on
            self._pending = obs
            self._last_obs_time = time.monotonic()
            self._cond.notify_all()
        return services_pb2.Empty()

    def GetActions(self, request, context):  # noqa: N802
        with self._cond:
            self._cond.wait_for(lambda: self._pending is not None, timeout=self.cfg.obs_wait_s)
            obs, self._pending = self._pending, None
            if obs is not None and self._planned_already(obs):
                self.stats["skipped_planned"] += 1
                return services_pb2.Empty()
        if obs is None:
            return self._maybe_hold_on_silence()
        if self._features is None:
            self._refuse(context, "send policy instructions before observations", grpc.StatusCode.FAILED_PRECONDITION)
        try:
            images, state = self._frame(obs)
        except (KeyError, ValueError, TypeError) as e:
            self._refuse(context, f"observation #{obs.timestep} does not match the robot's features ({e})")
        with self._plan_lock:
            actions_TA, why = self._chunk(obs.timestep, images, state)
            return self._send(obs, actions_TA, why)

    def _planned_already(self, obs: TimedObservation) -> bool:
        """An observation at or before the timestep the last plan started from (no action has run since: the same
        state) adds nothing but a plan's latency before the next useful one; skipped, unless the client's queue is
        empty (`must_go`), as LeRobot's own policy server does, or the last chunk has had the time to run (the
        robot is still there: that chunk was lost, e.g. answered to a call of a client that has gone, and the
        client sets `must_go` again only once it receives actions)."""
        if getattr(obs, "must_go", False) or self._last_plan_t is None or obs.timestep > self._last_plan_t:
            return False
        return time.monotonic() - self._last_chunk_at < (self._last_chunk_len + 1) / self.cfg.fps

    # ------------------------------------------------------------------ planning
    def _frame(self, obs: TimedObservation) -> tuple[np.ndarray, np.ndarray]:
        frame = build_dataset_frame(self._features, obs.observation, prefix="observation")
        frame = {self._rename.get(k, k): v for k, v in frame.items()}
        images = np.stack([np.asarray(frame[c], dtype=np.uint8) for c in self.cameras])
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images of shape {images.shape[1:]}, expected [H, W, 3]")
        return images, np.asarray(frame.get("observation.state", np.zeros(0)), dtype=np.float64)

    def _chunk(self, t: int, images: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, str]:
        """The safe chunk for timesteps t+1.. from the observation at t, and what it is (plan | hold_<reason>)."""
        self._last_state = state
        previous = self._sent.get(t)
        wm = self.mpc.wm
        fs = wm.actions.frameskip
        n = (self.cfg.chunk_frames or self.mpc.cfg.execute) * fs
        n = min(n, self._per_chunk or n)
        t0 = time.perf_counter()
        try:
            lead = self._lead(t, fs) if self.cfg.plan_ahead else []
            start = t + len(lead)  # the plan's first action is for start + 1
            shift = 0 if self._plan_start is None else max(0, (start - self._plan_start) // fs)
            context = self.mpc.encode(images, state)[None]
            if lead:
                context = self.mpc.predict(context, self._as_frames(lead, state))
            frames_HA = self.mpc.plan(context, None, shift=shift)
            steps = lead + [wm.actions.to_env(s, state) for f in frames_HA for s in wm.actions.frame_steps(f)][:n]
            self._last_plan_t, self._plan_start = t, start
        except Exception:  # noqa: BLE001 - a failed plan must stop the robot, not the server
            log.exception("planning failed on observation #%d: holding", t)
            return self.safety.hold(n, state, previous, reason="error", action_dim=wm.actions.step_dim), "hold_error"
        latency = time.perf_counter() - t0
        self.latencies.append(latency)
        if self.safety.missed_deadline(latency):
            log.warning("plan of observation #%d took %.0f ms, over the %.0f ms deadline: holding", t,
                        1e3 * latency, 1e3 * self.safety.cfg.deadline_s)
            return self.safety.hold(n, state, previous, reason="deadline", action_dim=wm.actions.step_dim), \
                "hold_deadline"
        return self.safety.filter_chunk(np.stack(steps), state, previous), "plan"

    def _lead(self, t: int, fs: int) -> list[np.ndarray]:
        """`plan_ahead`: the actions already sent for the timesteps after t that the robot will run while this plan
        is computed (the recent plans' median latency x fps, rounded up to whole model frames counted from t, at
        most the whole frames of what was sent). They are sent again at the head of the new chunk (LeRobot's client
        replaces its queue with a chunk), and the plan starts from the model's prediction after them."""
        if not self.latencies:
            return []
        need = int(np.ceil(float(np.median(self.latencies[-5:])) * self.cfg.fps))
        with self._cond:
            steps = []
            for s in range(t + 1, t + 1 + int(np.ceil(need / fs)) * fs):
                if s not in self._sent:
                    break
                steps.append(self._sent[s])
        return steps[: len(steps) // fs * fs]

    def _as_frames(self, steps: list[np.ndarray], state: np.ndarray) -> np.ndarray:
        """Robot actions as sent (after the safety guard) -> the model frames they make [P, A], converted with the
        observed state as `_chunk` converts the other way."""
        actions = self.mpc.wm.actions
        steps_TA = torch.as_tensor(np.stack(steps), dtype=torch.float32)
        states_TS = torch.as_tensor(np.broadcast_to(state, (len(steps), len(state))).copy(), dtype=torch.float32)
        return actions.per_frame(actions.from_dataset(steps_TA, states_TS)).numpy()

    def _maybe_hold_on_silence(self):
        """No observation: after `obs_timeout_s` of silence (once per period), a hold chunk after the last sent."""
        now = time.monotonic()
        with self._cond:
            quiet = self._last_obs_time is not None and now - self._last_obs_time > self.safety.cfg.obs_timeout_s
            if not (quiet and self.safety.cfg.enabled and now - self._last_hold > self.safety.cfg.obs_timeout_s
                    and self._sent):
                return services_pb2.Empty()
            self._last_hold = now
            last_t = max(self._sent)
        log.warning("no observation for %.1f s: sending a hold chunk", now - self._last_obs_time)
        hold = self.safety.hold(1, self._last_state, self._sent[last_t], reason="timeout",
                                action_dim=len(self._sent[last_t]))
        return self._send(TimedObservation(timestamp=time.time(), timestep=last_t, observation={}), hold,
                          "hold_timeout")

    def _send(self, obs: TimedObservation, actions_TA: np.ndarray, why: str):
        before = self.stats["chunks"]
        self.stats["chunks"] += 1
        self.stats["holds"] += why != "plan"
        t, dt = obs.timestep, 1.0 / self.cfg.fps
        chunk = [TimedAction(timestamp=obs.timestamp + (i + 1) * dt, timestep=t + 1 + i,
                             action=torch.as_tensor(a, dtype=torch.float32)) for i, a in enumerate(actions_TA)]
        with self._cond:
            self._last_chunk_at, self._last_chunk_len = time.monotonic(), len(actions_TA)
            for i, a in enumerate(actions_TA):
                self._sent[t + 1 + i] = np.asarray(a, np.float64)
            for old in [k for k in self._sent if k < t - 64]:
                del self._sent[old]
        lat = f"{1e3 * self.latencies[-1]:.0f} ms" if why != "hold_timeout" and self.latencies else "-"
        log.info("chunk #%d (%s) from observation #%d: %d actions, plan %s, %s; %d stale dropped so far", before + 1,
                 why, t, len(chunk), lat, self.safety.last_summary(), self.stats["dropped_stale"])
        return services_pb2.Actions(data=pickle.dumps(chunk))


class ServerHandle:
    """A started gRPC server around a `PlanningServer`: its `port`, `stop()`."""

    def __init__(self, servicer: PlanningServer, cfg: ServeConfig):
        check_bind(cfg.host, cfg.allow_remote)
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers),
                                  options=[("grpc.max_receive_message_length", 4 * 2**20)])
        services_pb2_grpc.add_AsyncInferenceServicer_to_server(servicer, self.server)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        try:
            self.port = self.server.add_insecure_port(f"{host}:{cfg.port}")
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise UserError(f"--host {cfg.host} --port {cfg.port}: cannot bind there (in use?); pick a free port")
        self.server.start()
        log.info("serving wmctl on %s:%d (LeRobot async inference; --policy_type=%s)", cfg.host, self.port,
                 POLICY_TYPE)

    def stop(self, grace: float | None = 0.5) -> None:
        self.server.stop(grace).wait()
        log.info("server stopped: %s; %s", self.servicer.report(), self.servicer.safety.report.summary())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeRunConfig:
    run: Path
    goal: GoalSpec
    serve: ServeConfig = ServeConfig()
    mpc: MPCConfig = MPCConfig()
    safety: SafetyConfig = SafetyConfig()  # bounds it leaves open come from the run's dataset
    encoder: Path | None = None
    device: str = "cpu"
    duration_s: float | None = None  # stop after this long (None: on SIGINT/SIGTERM or `stop`)


def build_server(cfg: ServeRunConfig) -> PlanningServer:
    """The run (and its encoder), its goal, and the safety guard with the dataset's ranges, as one servicer."""
    planning = load_planning(cfg.run, device=cfg.device, encoder=cfg.encoder)
    loader = functools.partial(load_goal, cameras=planning.cameras, size=planning.size)
    mpc = LatentMPC(planning.wm, planning.encode, cfg.mpc, loader(cfg.goal))
    s = cfg.safety
    given = s.workspace_low is not None and s.action_low is not None
    guard = SafetyGuard(s) if given or not s.enabled else SafetyGuard.from_dataset(s, planning.dataset_root)
    log.info("safety: action bounds %s, workspace %s, max step change %s", guard.action_bounds, guard.workspace,
             guard.max_step)
    return PlanningServer(mpc, guard, cfg.serve, cameras=planning.cameras, goal_loader=loader, run=str(cfg.run))


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop` (from the main thread; elsewhere the default handlers stay)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_serve(cfg: ServeRunConfig, *, stop: threading.Event | None = None) -> dict[str, Any]:
    """Serve `cfg.run` until SIGINT/SIGTERM, `stop` is set or `duration_s` passes; returns the report."""
    servicer, stop = build_server(cfg), stop or threading.Event()
    with _stop_on_signals(stop):
        handle = ServerHandle(servicer, cfg.serve)
        try:
            stop.wait(cfg.duration_s)
        finally:
            handle.stop()
    return servicer.report()
