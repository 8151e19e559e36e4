"""`wmctl plan sim`: closed-loop MPC in a simulator (`pipeline.sims`) with the world model (DINO-WM protocol).

A trial starts from the simulator state of a held-out episode at frame t; the goal is the observation
reached by replaying that episode's recorded actions for `goal_offset` steps from there. MPC then plans in
latent space from the encoded observations, executes `execute` actions, and replans, for at most
`max_steps` steps. Success is the simulator's rule (pusht: DINO-WM's, agent and block positions within 20 px of
the goal state, norm over the four coordinates, and the block angle within pi/9; Meta-World: end effector / object
within 5 cm, `pipeline.sims.metaworld`), checked after every MPC step; the trial ends there (the goal is reached).
A start/goal pair that already meets the rule is no trial and is skipped. The same trials run with uniformly
random actions, and, where the simulator has one (Meta-World), with its scripted policy driven to the goal state
from privileged simulator state (the upper bound), under the same rule. The planner never sees the simulator:
observations go through the frozen encoder, actions come out. `--env auto` takes the simulator the dataset was
recorded in (`wmctl data` writes it down). Each trial draws its randomness from (seed, policy, trial index) alone,
and finished trials are written down as they finish (`planner.progress`), so a run stopped by SIGTERM (exit 3) or killed
continues after its finished trials and ends where an uninterrupted run does.

The cost is the latent distance to the goal averaged over every planned frame (`cost_frames="all"`), not
only the last: with a goal nearer than the horizon, a last-frame cost is indifferent to the path, so the
executed part of each plan wanders and the agent is rarely at the goal when it is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.reader import TokenReader
from pipeline.lerobot_io import DataFileCache, stack_column
from pipeline.manifest import read_manifest
from pipeline.sims import ENV_STATE_KEY, SIMULATORS, Simulator, goal_group, make_sim, recorded_sim, trial_ok
from pipeline.stage import UserError, fault_point, to_jsonable
from planner.cem import CEMConfig, warm_start
from planner.core import ActionSpec, WorldModel, dtype_name, latent_cost
from planner.gd import GDConfig
from planner.planners import check_planner, expected_cost_rollout, plan, settings, spec_for
from planner.progress import SimProgress, SimStopped, Terminated, sigterm_stops
from planner.proposal import Observation
from planner.results import POLICY_IDS, SimResult, commit_result, plain_result, summarize

log = logging.getLogger(__name__)

SHIFTS = ("none", "lighting", "background")

# Closed-loop protocols: what a trial is (the goal's distance, the step budget, how far a plan looks and how much of
# it runs). `gym`: wmctl's own (goal 15 env steps ahead, 30 env steps, horizon 5 frames, 2 executed). `swm`:
# stable-worldmodel's PushT protocol, the field's reference for DINO-WM/PLDM/LeWM figures (goal: the dataset state 25
# env steps ahead; at most 50 env steps; plans of 5 frames at frameskip 5, all 5 executed before replanning; CEM 300
# samples x 30 iterations, top 30). The success rule is the simulator's (PushT: agent + block within 20 px, angle
# within pi/9) under both. Results of the two are never mixed: the protocol is part of a result's configuration.
PROTOCOLS: dict[str, dict[str, int]] = {
    "gym": {"goal_offset": 15, "max_steps": 30, "horizon": 5, "execute": 2},
    "swm": {"goal_offset": 25, "max_steps": 50, "horizon": 5, "execute": 5, "frameskip": 5},
}
SWM_CEM = {"samples": 300, "iterations": 30, "elites": 30}  # the published budget of the swm protocol


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimConfig:
    trials: int = 10
    goal_offset: int = 15  # env steps replayed from the start to make the goal
    max_steps: int = 30  # env steps of MPC per trial
    horizon: int = 5  # planning horizon (frames)
    execute: int = 2  # frames executed before replanning
    context: int = 2  # frames of history the model sees
    planner: str = "cem"
    cem: CEMConfig = CEMConfig()
    gd: GDConfig = GDConfig()
    max_delta_fraction: float = 0.5  # per-step change limit as a share of the action range (the safety guard)
    state_weight: float = 1.0  # with proprioception: weight of the state's distance to the goal state
    k: int = 4
    cost_frames: str = "all"  # "all": mean distance over the planned frames; "last": the last frame only
    execute_plan: str = "best"  # "best": the best sequence the planner found; "mean": CEM's final mean
    shift: str = "none"
    env: str = "auto"  # auto: the simulator the dataset was recorded in
    device: str = "cpu"
    seed: int = 0
    save_strips: int = 3
    noise_draws: int = 1  # > 1: each candidate scored by its mean cost over this many independent sampling-noise
    # draws (each draw reused by every CEM iteration), instead of one draw shared by all (common random numbers)
    protocol: str = "gym"  # see PROTOCOLS: its goal offset, step budget, horizon and execution are checked
    success_rule: str = "metaworld"  # Meta-World: its own success flag, or `strict` (the arm near the goal's too)
    serve_fps: int = 0  # > 0: the model's trials through `wmctl robot serve` + LeRobot's RobotClient at this rate
    serve_threshold: float = 0.5  # the client's chunk_size_threshold (LeRobot's default)
    serve_plan_ahead: bool = False  # the server's --plan-ahead
    out: Path | None = None

    def __post_init__(self) -> None:
        if self.serve_fps < 0 or not 0 <= self.serve_threshold <= 1:
            raise UserError(f"--serve-fps {self.serve_fps} / --serve-threshold {self.serve_threshold}: need a rate "
                            ">= 0 (0: the synchronous loop) and a threshold in [0, 1]")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        fixed = {k: v for k, v in PROTOCOLS[self.protocol].items() if k != "frameskip"}
        wrong = {k: getattr(self, k) for k, v in fixed.items() if getattr(self, k) != v}
        if wrong and self.protocol != "gym":
            raise UserError(f"--protocol {self.protocol} fixes {', '.join(f'{k}={v}' for k, v in fixed.items())}; "
                            f"got {wrong}: drop those options (the planning budget may differ, and is recorded)")
        if self.noise_draws < 1:
            raise UserError(f"--noise-draws {self.noise_draws}: must be >= 1")
        if self.env not in (*SIMULATORS, "auto"):
            raise UserError(f"--env {self.env!r}: choose auto or one of {', '.join(SIMULATORS)}")
        if self.shift not in SHIFTS:
            raise UserError(f"--shift {self.shift!r}: choose one of {SHIFTS}")
        check_planner(self.planner)
        if self.cost_frames not in ("all", "last"):
            raise UserError(f"--cost-frames {self.cost_frames!r}: choose all or last")
        if self.execute_plan not in ("best", "mean"):
            raise UserError(f"--execute-plan {self.execute_plan!r}: choose best or mean")


def apply_shift(img: np.ndarray, shift: str) -> np.ndarray:
    """Domain shift of a rendered frame before encoding: darker warm lighting, or a coloured background."""
    if shift == "lighting":
        out = img.astype(np.float32) * np.array([0.75, 0.65, 0.55])
        return np.clip(out + 10, 0, 255).astype(np.uint8)
    if shift == "background":
        out = img.copy()
        out[(img > 235).all(-1)] = np.array([200, 215, 240], dtype=np.uint8)  # the white background
        return out
    return img


@dataclasses.dataclass
class Trial:
    episode: int
    start: int
    env_state: np.ndarray  # the simulator's full state at the start (what `Simulator.reset` takes)
    actions: np.ndarray  # [goal_offset, A] the recorded environment actions replayed to make the goal
    group: str = "unknown"  # what the goal demands: "push" (the object must move) or "agent" (`Simulator.goal_group`)


def load_trials(root: Path, manifest_rows, cfg: SimConfig, sim: Simulator) -> list[Trial]:
    """Start states and recorded actions of held-out episodes (their LeRobot data files), drawn without replacement:
    the episodes are visited in a random order, round after round, each visit taking one of the episode's starts not
    drawn before, so trials spread over every held-out episode and no start is planned twice. A start whose goal
    (`goal_offset` env steps later) already meets the simulator's rule, or that the simulator's `trial_ok` refuses,
    is skipped."""
    data = DataFileCache(columns=[ENV_STATE_KEY, "action"])
    rng = np.random.default_rng(cfg.seed)
    rows = manifest_rows[(manifest_rows.split == "val") & manifest_rows.has_actions & (manifest_rows.status == "ok")]
    if rows.empty:
        raise UserError("the labelled source has no val episodes with actions; re-ingest with --val-fraction or "
                        "--val-episodes")
    episodes = []  # (row, states, actions, starts not drawn yet)
    for i in rng.permutation(len(rows)):
        e = rows.iloc[i]
        df = data.rows_in_file(Path(e.root) / e.data_file, int(e.episode_index))
        if ENV_STATE_KEY not in df:
            raise UserError(f"{e.root} has no {ENV_STATE_KEY}: the sim needs data recorded in the simulator "
                            "(`wmctl data pusht`)")
        if len(df) > cfg.goal_offset:
            episodes.append((e, stack_column(df, ENV_STATE_KEY), stack_column(df, "action"),
                             list(rng.permutation(len(df) - cfg.goal_offset))))
    trials: list[Trial] = []
    while len(trials) < cfg.trials and any(left for *_, left in episodes):
        for e, st, acts, left in episodes:
            while left and len(trials) < cfg.trials:
                t = int(left.pop())
                start, goal = st[t].astype(np.float64), st[t + cfg.goal_offset].astype(np.float64)
                if trial_ok(sim, start, goal):
                    trials.append(Trial(int(e.episode_index), t, st[t], acts[t:t + cfg.goal_offset],
                                        goal_group(sim, start, goal)))
                    break
    if not trials:
        raise UserError(f"no val episode is longer than --goal-offset {cfg.goal_offset} with a goal the start does "
                        "not already meet: raise --goal-offset or record longer episodes")
    if len(trials) < cfg.trials:
        log.warning("only %d distinct trials in %d val episodes (asked for %d): hold out more episodes "
                    "(ingest --val-episodes)", len(trials), len(episodes), cfg.trials)
    return trials


@dataclasses.dataclass
class _Episode:
    """What one trial has done so far: the encoded observations (None where the policy needs none), the model-space
    actions that led into each observation after the first, the frames, the plan latencies, the last plan's mean."""

    history: list[torch.Tensor | None]  # None: not encoded (yet): `_observe` encodes what a plan reads
    frames: list[np.ndarray]
    robot: list[np.ndarray]  # the robot state at each frame (what the encoder's proprio token reads)
    executed: list[np.ndarray] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    plan_mean: torch.Tensor | None = None
    goal: torch.Tensor | None = None  # the goal's latents [N, Z] (what a proposal planner reads)


def run_trial(sim: Simulator, wm: WorldModel, encode: Callable[[np.ndarray, np.ndarray], torch.Tensor], trial: Trial,
              cfg: SimConfig, spec: ActionSpec, policy: str, rng: np.random.Generator, served=None
              ) -> dict[str, Any]:
    """One MPC episode (policy "model"), or one of random actions or the simulator's scripted controller.
    Returns the outcome, the latencies and the frames. `served` (a started-on-demand `planner.simrobot.ServedLoop`):
    the model's episode runs through the server and LeRobot's client instead.
    `encode(images [C, H, W, 3], robot_state)` gives the model's latents of an observation (the robot state is
    the dataset's `observation.state`, used by models with proprioception)."""
    goal_img = sim.reset(trial.env_state)
    for i, a in enumerate(trial.actions):
        goal_img = sim.step(a, render=i == len(trial.actions) - 1)
    goal_img = apply_shift(goal_img, cfg.shift)
    goal_state, goal_robot = sim.state(), sim.robot_state()
    img = apply_shift(sim.reset(trial.env_state), cfg.shift)
    start_state = sim.state()
    model = policy == "model"
    if model and served is not None:  # through `wmctl robot serve` and LeRobot's RobotClient (planner.simrobot)
        if served.proc is None:
            served.start(goal_img, goal_robot)
        return served.trial(sim, img, start_state, goal_img, goal_robot, goal_state)
    goal = encode(goal_img, goal_robot) if model else None  # [N, Z]; proprio: one more token
    t_loop = time.perf_counter()  # the control loop: simulator, rendering, encoding, planning (not the goal)
    ep = _Episode(history=[None], frames=[img], robot=[sim.robot_state()], goal=goal)
    fs = wm.actions.frameskip
    lo, hi = np.array(spec.low), np.array(spec.high)
    weights = torch.ones(cfg.horizon) if cfg.cost_frames == "all" else None
    cost = latent_cost(goal, state_dim=wm.state_dim, state_weight=cfg.state_weight, frame_weights=weights) \
        if model else None
    while len(ep.executed) * fs < cfg.max_steps:
        if policy == "scripted":  # the upper bound: privileged state, the simulator's own controller
            _scripted_frame(sim, ep, goal_state, cfg.shift, fs)
        else:
            frames = lo + (hi - lo) * rng.random((cfg.execute, spec.dim)) if policy == "random" else \
                _model_plan(wm, _observe(ep, encode, cfg.context), cost, cfg, spec, rng)
            _execute(sim, wm, ep, frames, cfg)
        if sim.success(goal_state, sim.state()):
            break  # the goal is reached: the trial ends
    loop_s, final = time.perf_counter() - t_loop, sim.state()
    steps = np.diff(np.stack(ep.executed), axis=0) if len(ep.executed) > 1 else np.zeros((1, spec.dim))
    start = sim.distances(goal_state, start_state)
    return {"success": sim.success(goal_state, final), "steps": len(ep.executed) * fs,
            **{f"final_{k}": v for k, v in sim.distances(goal_state, final).items()},
            **{f"start_{k}": v for k, v in start.items()},
            "smoothness": float(np.linalg.norm(steps, axis=1).mean()), "latencies": ep.latencies, "loop_s": loop_s,
            "frames": ep.frames, "goal": goal_img}


def _scripted_frame(sim: Simulator, ep: _Episode, goal_state: np.ndarray, shift: str, fs: int) -> None:
    """One frame (fs env steps) of the simulator's controller driven to the goal state."""
    for i in range(fs):
        act = sim.oracle_action(goal_state)
        img = sim.step(act, render=i == fs - 1)
    img = apply_shift(img, shift)
    ep.executed.append(np.asarray(act, dtype=np.float64))
    ep.history.append(None)
    ep.robot.append(sim.robot_state())
    ep.frames.append(img)


def _observe(ep: _Episode, encode: Callable[[np.ndarray, np.ndarray], torch.Tensor], context: int) -> _Episode:
    """Encode the last `context` frames where not done yet: only the frames a plan reads go through the encoder
    (executing more frames per plan than the context holds, the others never do)."""
    for i in range(max(0, len(ep.frames) - context), len(ep.frames)):
        if ep.history[i] is None:
            ep.history[i] = encode(ep.frames[i], ep.robot[i])
    return ep


def _model_plan(wm: WorldModel, ep: _Episode, cost, cfg: SimConfig, spec: ActionSpec, rng: np.random.Generator
                ) -> np.ndarray:
    """One MPC step: plan from the last `cfg.context` observations (and the actions that led into them),
    warm-started from the previous plan; the first `cfg.execute` frames [E, A] of the plan (or of its mean)."""
    ctx = torch.stack(ep.history[-cfg.context:])
    acts = [np.zeros(spec.dim)] + ep.executed
    ctx_actions = torch.as_tensor(np.stack(acts[-len(ctx):]), dtype=torch.float32)
    prev = torch.as_tensor(ep.executed[-1], dtype=torch.float32) if ep.executed else None
    seed = int(rng.integers(2**31))
    t0 = time.perf_counter()  # the latency includes committing the context
    rollout, plan_cost = expected_cost_rollout(wm, ctx, ctx_actions, cost, k=cfg.k, seed=seed, draws=cfg.noise_draws)
    init = warm_start(ep.plan_mean, cfg.execute, cfg.horizon, spec.dim)
    res = plan(cfg.planner, rollout, plan_cost, spec, settings(cfg.planner, cfg), horizon=cfg.horizon,
               generator=torch.Generator().manual_seed(seed), init_mean_HA=init, previous_A=prev,
               observation=Observation(wm, ctx[-1], ep.goal))
    ep.latencies.append(time.perf_counter() - t0)
    ep.plan_mean = res.mean
    return (res.mean if cfg.execute_plan == "mean" else res.actions)[: cfg.execute].numpy()


def _execute(sim: Simulator, wm: WorldModel, ep: _Episode, frames: np.ndarray, cfg: SimConfig) -> None:
    """Run planned frames [E, A] (model space) in the simulator, each as its env steps, keeping what is seen (the
    next plan encodes what it reads: `_observe`); stops at the step budget."""
    for a in frames:
        steps = wm.actions.frame_steps(a)
        for i, step in enumerate(steps):  # only the frame's last env step is seen (rendered)
            img = sim.step(wm.actions.to_env(step, sim.robot_state()), render=i == len(steps) - 1)
        img = apply_shift(img, cfg.shift)
        ep.executed.append(np.asarray(a, dtype=np.float64))
        ep.history.append(None)
        ep.frames.append(img)
        ep.robot.append(sim.robot_state())
        if len(ep.executed) * wm.actions.frameskip >= cfg.max_steps:
            break


def observation_encoder(wm: WorldModel, device: str, *, hints: tuple[str | None, ...] = ()
                        ) -> Callable[[np.ndarray, np.ndarray], torch.Tensor]:
    """`encode(images [C, H, W, 3], robot_state) -> latents [N, Z]` with the encoder the model was trained on
    (looked for in `hints` first: where the store was encoded from)."""
    from featurestore.encoders import encoder_for

    enc = encoder_for(wm.encoder, device, hints=hints)

    def encode(images: np.ndarray, robot_state: np.ndarray) -> torch.Tensor:
        patch = enc.encode(torch.from_numpy(np.ascontiguousarray(images)))["patch"]  # [C, P, Z]
        return wm.normalize(patch, robot_state)

    return encode


@dataclasses.dataclass(frozen=True)
class SimSource:
    """The labelled source start states and goals come from (its held-out episodes), as the simulator needs it."""

    name: str  # the store source
    rows: Any  # manifest rows
    size: int  # image size of its cameras
    fps: int
    cameras: list[str]  # camera keys in the store's order
    recorded_in: str | None  # the simulator `wmctl data` recorded it in (None: not written by wmctl)


def labelled_source(reader: TokenReader) -> SimSource:
    labelled = [s for s in reader.store.sources() if reader.source_attrs(s).get("has_actions")]
    if not labelled:
        raise UserError(f"{reader.path} has no labelled source to take start states and goals from")
    attrs = reader.source_attrs(labelled[0])
    if attrs.get("stride", 1) > 1:
        raise UserError(f"{reader.path}: source {labelled[0]} is stored at {attrs['stored_fps']:g} fps (every "
                        f"{attrs['stride']}th frame of its {attrs['fps']:g}); the closed loop replays episodes at "
                        "their recorded rate and does not take a strided store yet: encode the dataset at its own "
                        "rate (no --fps) into the store you plan with")
    rows, meta = read_manifest(Path(attrs["manifest"]))
    return SimSource(labelled[0], rows, int(meta["features"][attrs["cameras"][0]]["shape"][0]),
                     int(meta.get("fps") or 0),
                     list(attrs["cameras"]), recorded_sim(Path(rows.iloc[0].root)) if not rows.empty else None)


def resolve_env(env: str, source: SimSource) -> str:
    """`--env auto` -> the simulator the dataset was recorded in; an explicit one must match it when known."""
    if env == "auto":
        if source.recorded_in is None:
            raise UserError("the labelled source was not recorded by `wmctl data`, so its simulator is unknown: pass "
                            f"--env ({', '.join(SIMULATORS)})")
        return source.recorded_in
    if source.recorded_in is not None and env != source.recorded_in:
        raise UserError(f"--env {env}: the labelled source was recorded in {source.recorded_in}; its start states "
                        f"only restore there (pass --env {source.recorded_in} or --env auto)")
    return env


def trial_rng(seed: int, policy: str, index: int) -> np.random.Generator:
    """A trial's own randomness, from (seed, policy, trial index) alone: a trial's outcome does not depend on the
    trials run before it, so a run resumed after its k-th trial equals an uninterrupted one."""
    return np.random.default_rng([seed, POLICY_IDS[policy], index])


def run_plan_sim(wm: WorldModel, cfg: SimConfig, *, store: Path,
                 encode_frame: Callable[[np.ndarray, np.ndarray], torch.Tensor] | None = None,
                 on_total: Callable[[int], None] | None = None,
                 on_progress: Callable[[int], None] | None = None, serve: Callable[..., Any] | None = None
                 ) -> SimResult:
    """Trials from the held-out episodes of the model's store, MPC and random actions on each; writes
    `cfg.out`/sim.json (and PNG strips) when `cfg.out` is set. Finished trials are written as they finish
    (`SimProgress`): a run stopped (SIGTERM: SimStopped) or killed continues from them when run again.
    `on_total(n)`: the trials to run (every policy's, less those finished before); `on_progress(1)` as each ends.
    `serve(wm, cfg, source, sim)`: the served loop of `cfg.serve_fps` (`planner.simrobot.served_loop`)."""
    if wm.actions.frame_dim == 0:
        raise UserError("this model was trained without actions; the sim needs an action-conditioned model")
    reader = TokenReader(store)
    source = labelled_source(reader)
    wm = wm.for_source(reader, source.name)  # the model on that source's cameras
    env = resolve_env(cfg.env, source)
    need = PROTOCOLS[cfg.protocol].get("frameskip")
    if need is not None and wm.actions.frameskip != need:
        raise UserError(f"--protocol {cfg.protocol} plans frames of {need} env steps; this model was trained at "
                        f"frameskip {wm.actions.frameskip}: train one with --set frameskip={need}")
    encode = encode_frame or observation_encoder(wm, cfg.device, hints=(reader.store.encoder_location,))
    spec = spec_for(wm, cfg.max_delta_fraction)
    sim = make_sim(env, source.size, fps=source.fps, camera_keys=source.cameras, success_rule=cfg.success_rule)
    try:
        trials = load_trials(Path(source.rows.iloc[0].root), source.rows, cfg, sim)
        config = {k: v for k, v in dataclasses.asdict(cfg).items()  # serve_*: only where the loop was served
                  if k != "out" and not (k.startswith("serve_") and not cfg.serve_fps)}
        policies = ("model", "random", "scripted") if hasattr(sim, "oracle_action") else ("model", "random")
        progress = SimProgress(cfg.out, {"config": to_jsonable(config), "dtype": dtype_name(wm.dtype), "env": env,
                                         "model": str(getattr(wm, "checkpoint", "")),
                                         "trials": [[tr.episode, tr.start] for tr in trials]})
        if on_total is not None:
            on_total(sum((policy, i) not in progress.done for policy in policies for i in range(len(trials))))
        if cfg.serve_fps and serve is None:
            raise UserError("--serve-fps needs the served loop (`planner.simrobot.served_loop`)")
        served = serve(wm, cfg, source, sim) if cfg.serve_fps else None
        run = functools.partial(_run_policy, sim, wm, encode, trials, cfg, spec, progress, on_progress, served)
        try:
            with sigterm_stops():
                try:
                    outcomes = {policy: summarize(trials, run(policy)) for policy in policies}
                except Terminated:
                    raise SimStopped(len(progress.done), len(trials) * len(policies), progress.file) from None
        finally:
            report = served.stop() if served is not None else None
        res = SimResult(config=config, env=env, cameras=source.cameras, trials=len(trials),
                        dtype=dtype_name(wm.dtype), simulator=sim.describe() if hasattr(sim, "describe") else None,
                        served=None if served is None else served.describe(report),
                        **outcomes)
    finally:
        sim.close()
    if cfg.out is not None:
        res = commit_result(cfg.out, res, progress.strips)
        progress.clear()  # the partial file goes once sim.json holds its trials
    return res


def _run_policy(sim: Simulator, wm: WorldModel, encode, trials: list[Trial], cfg: SimConfig, spec: ActionSpec,
                progress: SimProgress, on_progress: Callable[[int], None] | None, served, policy: str
                ) -> list[dict[str, Any]]:
    """Every trial of one policy, each from its own RNG; those finished earlier (`progress`) are taken as they
    were, the others run and are written down as each finishes."""
    results = []
    for i, tr in enumerate(trials):
        r = progress.done.get((policy, i))
        if r is None:
            full = run_trial(sim, wm, encode, tr, cfg, spec, policy, trial_rng(cfg.seed, policy, i), served)
            r = plain_result(full)
            strip = (tr, full) if policy == "model" and i < cfg.save_strips else None
            progress.add(policy, i, r, strip)
            log.info("%s trial %d/%d: success=%s %s", policy, i + 1, len(trials), r["success"],
                     ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k.startswith(("final_", "start_"))))
            fault_point("sim-trial")
            if on_progress is not None:
                on_progress(1)
        results.append(r)
    return results
