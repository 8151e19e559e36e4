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
and finished trials are written down as they finish (`SimProgress`), so a run stopped by SIGTERM (exit 3) or killed
continues after its finished trials and ends where an uninterrupted run does.

The cost is the latent distance to the goal averaged over every planned frame (`cost_frames="all"`), not
only the last: with a goal nearer than the horizon, a last-frame cost is indifferent to the path, so the
executed part of each plan wanders and the agent is rarely at the goal when it is checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.reader import TokenReader
from pipeline.lerobot_io import DataFileCache, stack_column
from pipeline.manifest import read_manifest
from pipeline.sims import ENV_STATE_KEY, SIMULATORS, Simulator, goal_group, make_sim, recorded_sim, trial_ok
from pipeline.stage import (
    UserError,
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    config_differences,
    fault_point,
    read_json,
    to_jsonable,
)
from planner.cem import CEMConfig, cem_plan, warm_start
from planner.core import ActionSpec, WorldModel, dtype_name, latent_cost
from planner.gd import GDConfig, gd_plan
from planner.offline import spec_for

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
    out: Path | None = None

    def __post_init__(self) -> None:
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
        if self.planner not in ("cem", "gd"):
            raise UserError(f"--planner {self.planner!r}: choose cem or gd")
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
        white = (img > 235).all(-1)
        out[white] = np.array([200, 215, 240], dtype=np.uint8)
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


def run_trial(sim: Simulator, wm: WorldModel, encode: Callable[[np.ndarray, np.ndarray], torch.Tensor], trial: Trial,
              cfg: SimConfig, spec: ActionSpec, policy: str, rng: np.random.Generator) -> dict[str, Any]:
    """One MPC episode (policy "model"), or one of random actions or the simulator's scripted controller.
    Returns the outcome, the latencies and the frames.
    `encode(images [C, H, W, 3], robot_state)` gives the model's latents of an observation (the robot state is
    the dataset's `observation.state`, used by models with proprioception)."""
    sim.reset(trial.env_state)
    for a in trial.actions:
        goal_img = sim.step(a)
    goal_img = apply_shift(goal_img, cfg.shift)
    goal_state, goal_robot = sim.state(), sim.robot_state()
    img = apply_shift(sim.reset(trial.env_state), cfg.shift)
    start_state = sim.state()
    goal = encode(goal_img, goal_robot) if policy == "model" else None  # [N, Z]; proprio: one more token
    history = [encode(img, sim.robot_state()) if policy == "model" else None]
    executed: list[np.ndarray] = []  # model-space actions that led into each history frame after the first
    frames, latencies, plan_mean = [img], [], None
    fs = wm.actions.frameskip
    lo, hi = np.array(spec.low), np.array(spec.high)
    weights = torch.ones(cfg.horizon) if cfg.cost_frames == "all" else None
    cost = latent_cost(goal, state_dim=wm.state_dim, state_weight=cfg.state_weight, frame_weights=weights) \
        if policy == "model" else None
    while len(executed) * fs < cfg.max_steps:
        if policy == "scripted":  # the upper bound: privileged state, the simulator's own controller
            for _ in range(fs):
                act = sim.oracle_action(goal_state)
                img = apply_shift(sim.step(act), cfg.shift)
            executed.append(np.asarray(act, dtype=np.float64))
            history.append(None)
            frames.append(img)
            if sim.success(goal_state, sim.state()):
                break
            continue
        if policy == "random":
            plan = lo + (hi - lo) * rng.random((cfg.execute, spec.dim))
        else:
            ctx = torch.stack(history[-cfg.context:])
            acts = [np.zeros(spec.dim)] + executed
            ctx_actions = torch.as_tensor(np.stack(acts[-len(ctx):]), dtype=torch.float32)
            prev = torch.as_tensor(executed[-1], dtype=torch.float32) if executed else None
            seed = int(rng.integers(2**31))
            t0 = time.perf_counter()  # the latency includes committing the context
            rollout, plan_cost = expected_cost_rollout(wm, ctx, ctx_actions, cost, k=cfg.k, seed=seed,
                                                       draws=cfg.noise_draws)
            g = torch.Generator().manual_seed(seed)
            init = warm_start(plan_mean, cfg.execute, cfg.horizon, spec.dim)
            if cfg.planner == "cem":
                res = cem_plan(rollout, plan_cost, spec, dataclasses.replace(cfg.cem, horizon=cfg.horizon),
                               generator=g, init_mean_HA=init, previous_A=prev)
            else:
                res = gd_plan(functools.partial(rollout, grad=True), plan_cost, spec,
                              dataclasses.replace(cfg.gd, horizon=cfg.horizon), generator=g, init_mean_HA=init,
                              previous_A=prev)
            latencies.append(time.perf_counter() - t0)
            plan_mean = res.mean
            plan = (res.mean if cfg.execute_plan == "mean" else res.actions)[: cfg.execute].numpy()
        for a in plan:
            for step in wm.actions.frame_steps(a):
                img = apply_shift(sim.step(wm.actions.to_env(step, sim.robot_state())), cfg.shift)
            executed.append(np.asarray(a, dtype=np.float64))
            history.append(encode(img, sim.robot_state()) if policy == "model" else None)
            frames.append(img)
            if len(executed) * fs >= cfg.max_steps:
                break
        if sim.success(goal_state, sim.state()):
            break  # the goal is reached: the trial ends
    final = sim.state()
    steps = np.diff(np.stack(executed), axis=0) if len(executed) > 1 else np.zeros((1, spec.dim))
    start = sim.distances(goal_state, start_state)
    return {"success": sim.success(goal_state, final), "steps": len(executed) * fs,
            **{f"final_{k}": v for k, v in sim.distances(goal_state, final).items()},
            **{f"start_{k}": v for k, v in start.items()},
            "smoothness": float(np.linalg.norm(steps, axis=1).mean()), "latencies": latencies,
            "frames": frames, "goal": goal_img}


def expected_cost_rollout(wm: WorldModel, ctx: torch.Tensor, ctx_actions: torch.Tensor, cost, *, k: int, seed: int,
                          draws: int = 1):
    """(rollout, cost) for the planner. draws = 1: one sampling-noise draw shared by every candidate and iteration
    (the model's own planning rollout). draws = D > 1: D independent draws (seeds seed..seed+D-1), each shared by every
    candidate, and a candidate's cost is its mean over them: planning on the expected cost under the model's
    uncertainty rather than on one sample of it. A deterministic or teacher-forced model has one outcome: D is 1."""
    if draws == 1 or getattr(wm, "kind", "") == "teacher_forced":
        return wm.planning_rollout(ctx, context_actions_TA=ctx_actions, k=k, seed=seed), cost
    rollouts = [wm.planning_rollout(ctx, context_actions_TA=ctx_actions, k=k, seed=seed + d) for d in range(draws)]

    def rollout(actions_SHA: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return torch.stack([r(actions_SHA, grad=grad) for r in rollouts])  # [D, S, H, N, Z]

    def mean_cost(latents_DSHNZ: torch.Tensor, actions_SHA: torch.Tensor) -> torch.Tensor:
        return torch.stack([cost(z, actions_SHA) for z in latents_DSHNZ]).mean(0)  # [S]

    return rollout, mean_cost


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


POLICY_IDS = {"model": 0, "random": 1, "scripted": 2}


def trial_rng(seed: int, policy: str, index: int) -> np.random.Generator:
    """A trial's own randomness, from (seed, policy, trial index) alone: a trial's outcome does not depend on the
    trials run before it, so a run resumed after its k-th trial equals an uninterrupted one."""
    return np.random.default_rng([seed, POLICY_IDS[policy], index])


class SimStopped(Exception):
    """SIGTERM during `plan sim`: the finished trials are kept (`SimProgress`); the same command continues."""

    def __init__(self, kept: int, total: int, partial: Path | None):
        self.kept, self.total = kept, total
        where = f" in {partial}" if partial else " (not written: no --out)"
        super().__init__(f"plan sim stopped on request: {kept} of {total} trials finished and kept{where}; run the "
                         "same command again to continue after them")


class _Terminated(Exception):
    pass


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, `kill`) raises _Terminated in the trial loop instead of ending the process."""
    def stop(signum, frame):
        raise _Terminated()

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: the default action stays
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_plan_sim(wm: WorldModel, cfg: SimConfig, *, store: Path,
                 encode_frame: Callable[[np.ndarray, np.ndarray], torch.Tensor] | None = None) -> dict[str, Any]:
    """Trials from the held-out episodes of the model's store, MPC and random actions on each; writes
    `cfg.out`/sim.json (and PNG strips) when `cfg.out` is set. Finished trials are written as they finish
    (`SimProgress`): a run stopped (SIGTERM: SimStopped) or killed continues from them when run again."""
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
        out: dict[str, Any] = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
                               "env": env, "cameras": source.cameras, "trials": len(trials),
                               "dtype": dtype_name(wm.dtype)}
        if hasattr(sim, "describe"):
            out["simulator"] = sim.describe()
        policies = ("model", "random", "scripted") if hasattr(sim, "oracle_action") else ("model", "random")
        progress = SimProgress(cfg.out, {"config": to_jsonable(out["config"]), "dtype": out["dtype"], "env": env,
                                         "model": str(getattr(wm, "checkpoint", "")),
                                         "trials": [[tr.episode, tr.start] for tr in trials]})
        run = functools.partial(_run_policy, sim, wm, encode, trials, cfg, spec, progress)
        with _sigterm_stops():
            try:
                for policy in policies:
                    results = run(policy)
                    records = [trial_record(tr, r) for tr, r in zip(trials, results)]
                    out[policy] = {**summarize(results), "by_group": by_group(records), "per_trial": records}
            except _Terminated:
                raise SimStopped(len(progress.done), len(trials) * len(policies), progress.file) from None
    finally:
        sim.close()
    if cfg.out is not None:
        commit_result(cfg.out, out, progress)
    return out


def _run_policy(sim: Simulator, wm: WorldModel, encode, trials: list[Trial], cfg: SimConfig, spec: ActionSpec,
                progress: SimProgress, policy: str) -> list[dict[str, Any]]:
    """Every trial of one policy, each from its own RNG; those finished earlier (`progress`) are taken as they
    were, the others run and are written down as each finishes."""
    results = []
    for i, tr in enumerate(trials):
        r = progress.done.get((policy, i))
        if r is None:
            full = run_trial(sim, wm, encode, tr, cfg, spec, policy, trial_rng(cfg.seed, policy, i))
            r = plain_result(full)
            strip = (tr, full) if policy == "model" and i < cfg.save_strips else None
            progress.add(policy, i, r, strip)
            log.info("%s trial %d/%d: success=%s %s", policy, i + 1, len(trials), r["success"],
                     ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k.startswith(("final_", "start_"))))
            fault_point("sim-trial")
        results.append(r)
    return results


def plain_result(r: dict[str, Any]) -> dict[str, Any]:
    """A trial's outcome as plain JSON values (no frames): what a resumed run reads back, bit for bit."""
    return {"success": bool(r["success"]), "steps": int(r["steps"]),
            **{k: float(v) for k, v in r.items() if k.startswith(("final_", "start_"))},
            "smoothness": float(r["smoothness"]), "latencies": [float(x) for x in r["latencies"]]}


PARTIAL, PARTIAL_STRIPS = "sim.partial.jsonl", "sim.partial-strips"


class SimProgress:
    """The finished trials of a `plan sim` in progress: `<out>/sim.partial.jsonl`, a header line (the run's
    configuration, model, simulator and trials), then one line per finished trial, appended and fsynced as it
    finishes (a line torn by a kill is dropped when read back); the PNG strips of finished trials wait in
    `<out>/sim.partial-strips/`. A run of the same configuration continues after them; one of another
    configuration starts over. sim.json replaces them at the end."""

    def __init__(self, out: Path | None, header: dict[str, Any]):
        self.header = json.loads(json.dumps(header))
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        self.strips: dict[int, Path] = {}
        self.file = Path(out) / PARTIAL if out is not None else None
        self.strips_dir = Path(out) / PARTIAL_STRIPS if out is not None else None
        if self.file is not None:
            self._resume()

    def _resume(self) -> None:
        lines = self.file.read_bytes().splitlines() if self.file.is_file() else []
        records = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:  # torn by a kill while being appended: it and anything after it are dropped
                break
            if records and not _is_trial_record(rec):
                break
            records.append(rec)
        if not records or records[0] != {"header": self.header}:
            if len(records) > 1:
                log.warning("%s holds %d finished trials of another configuration (or model): starting over",
                            self.file, len(records) - 1)
            shutil.rmtree(self.strips_dir, ignore_errors=True)
            atomic_write_bytes(self.file, _line({"header": self.header}))
            return
        if len(records) < len(lines):  # rewrite without the torn tail before appending after it
            atomic_write_bytes(self.file, b"".join(_line(r) for r in records))
        for r in records[1:]:
            self.done[(r["policy"], r["index"])] = r["result"]
            if r.get("strip"):
                self.strips[r["index"]] = self.strips_dir / r["strip"]
        if self.done:
            log.info("resuming from %s: %d finished trials kept", self.file, len(self.done))

    def add(self, policy: str, index: int, result: dict[str, Any], strip: tuple[Trial, dict[str, Any]] | None
            ) -> None:
        record: dict[str, Any] = {"policy": policy, "index": index, "result": result}
        if self.file is not None:
            if strip is not None:
                path = save_strip(*strip, self.strips_dir)
                self.strips[index] = path
                record["strip"] = path.name
            fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, _line(record))  # one write of one line: a kill leaves it whole or torn, never mixed
                os.fsync(fd)
            finally:
                os.close(fd)
        self.done[(policy, index)] = result

    def clear(self) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)
            shutil.rmtree(self.strips_dir, ignore_errors=True)


def _is_trial_record(rec: Any) -> bool:
    return (isinstance(rec, dict) and rec.get("policy") in POLICY_IDS and isinstance(rec.get("index"), int)
            and isinstance(rec.get("result"), dict) and "success" in rec["result"])


def _line(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def commit_result(out_dir: Path, out: dict[str, Any], progress: SimProgress) -> None:
    """sim.json of this run: an earlier result of another configuration is kept beside it with its strips (moved
    into a folder named after its kept JSON); the strips of the result replaced are deleted; this run's strips
    move in; the partial file goes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sim.json"
    kept = keep_other_result(path, out)
    if kept is not None:
        keep_strips(kept)
    elif path.is_file():
        for old in _listed_strips(path):
            old.unlink(missing_ok=True)
    strips = []
    for index in sorted(progress.strips):
        src = progress.strips[index]
        if src.is_file():
            os.replace(src, out_dir / src.name)
            strips.append(str(out_dir / src.name))
    if strips:
        out["strips"] = strips
    atomic_write_json(path, out)
    progress.clear()


def _listed_strips(result: Path) -> list[Path]:
    """The strip files a sim.json lists, found beside it (by name: the paths it holds may be relative to another
    working folder)."""
    try:
        listed = read_json(result).get("strips", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [result.parent / Path(s).name for s in listed if isinstance(s, str) and (result.parent / Path(s).name)
            .is_file()]


def keep_strips(kept: Path) -> None:
    """Move the strips a kept result (sim-<time>.json) lists into the folder sim-<time>/ beside it, and point its
    `strips` there: the next result's strips may have the same names (the same trials)."""
    files = _listed_strips(kept)
    if not files:
        return
    folder = kept.with_suffix("")
    folder.mkdir(exist_ok=True)
    for f in files:
        os.replace(f, folder / f.name)
    res = read_json(kept)
    res["strips"] = [str(folder / f.name) for f in files]
    atomic_write_json(kept, res)


def trial_record(trial: Trial, r: dict[str, Any]) -> dict[str, Any]:
    """One trial's outcome as sim.json keeps it: which start (episode, frame), success, env steps, the final and
    start distances and the mean plan latency, so two runs on the same trials can be compared trial by trial."""
    lat = r["latencies"]
    return {"episode": trial.episode, "start": trial.start, "group": trial.group, "success": bool(r["success"]),
            "steps": int(r["steps"]),
            **{k: float(v) for k, v in r.items() if k.startswith(("final_", "start_"))},
            "plan_s": float(np.mean(lat)) if lat else None}


def by_group(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Success per goal group (`Trial.group`): trials whose goal needs the object moved apart from those the robot
    alone can meet, so an agent-only success cannot pass for a push."""
    out: dict[str, dict[str, Any]] = {}
    for g in sorted({r.get("group", "unknown") for r in records}):
        rs = [r for r in records if r.get("group", "unknown") == g]
        out[g] = {"trials": len(rs), "successes": sum(bool(r["success"]) for r in rs),
                  "success_rate": float(np.mean([r["success"] for r in rs]))}
    return out


def keep_other_result(path: Path, new: dict[str, Any]) -> Path | None:
    """A sim.json already at `path` from another configuration (other K, seed, budget, trials, dtype) is renamed
    to sim-<its time>.json beside it instead of being overwritten: a comparison run into the same folder must
    not erase the result it is compared with. The same configuration run again replaces it (idempotent).
    Returns the kept file, or None."""
    if not path.is_file():
        return None
    try:
        old = read_json(path)
    except (OSError, ValueError):
        old = {}
    mine = {"config": to_jsonable(new["config"]), "dtype": new.get("dtype")}
    diff = config_differences({"config": old.get("config", {}), "dtype": old.get("dtype")}, mine)
    if not diff:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"sim-{stamp}.json")
    i = 1
    while kept.exists():
        kept, i = path.with_name(f"sim-{stamp}-{i}.json"), i + 1
    path.rename(kept)
    log.info("kept the earlier result of another configuration as %s (%s)", kept, "; ".join(diff[:4]))
    return kept


def load_sim_result(path: Path) -> dict[str, Any]:
    """A `plan sim` result: sim.json, or the folder holding it."""
    file = path / "sim.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no sim.json there; pass a `wmctl plan sim` output folder "
                        "(<run>/plan/sim_<planner>_<shift>/) or its sim.json")
    res = read_json(file)
    if "per_trial" not in res.get("model", {}):
        raise UserError(f"{file} has no per-trial outcomes (written before sim.json kept them): re-run that "
                        "`wmctl plan sim` to compare it trial by trial")
    return res


def exact_mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: the probability, if A and B were equally good, of a split of the discordant
    trials at least this uneven (a binomial(n, 1/2) tail, doubled)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


_OLD_DEFAULTS = {"protocol": "gym", "success_rule": "strict"}  # what results written before these fields meant


def compare_sims(pairs: list[tuple[dict[str, Any], dict[str, Any]]], policy: str = "model") -> dict[str, Any]:
    """Paired comparison of two planners (A, B) over one or more pairs of `plan sim` results, each pair run on
    the same trials (e.g. one pair per model seed or per trial set): successes, the trials only one of them
    solves, the exact McNemar p-value of that split, and per final distance the means and how often A ends
    closer. The i-th trial of A is paired with the i-th of B, which must start from the same episode and frame;
    a pair on different trials is refused."""
    rows: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for i, (a, b) in enumerate(pairs):
        if a.get("env") != b.get("env"):
            raise UserError(f"pair {i + 1}: A ran in {a.get('env')}, B in {b.get('env')}; compare runs of one "
                            "simulator")
        for key in ("protocol", "goal_offset", "max_steps", "success_rule"):
            if a["config"].get(key, _OLD_DEFAULTS.get(key)) != b["config"].get(key, _OLD_DEFAULTS.get(key)):
                raise UserError(f"pair {i + 1}: --{key.replace('_', '-')} {a['config'].get(key)} (A) vs "
                                f"{b['config'].get(key)} (B): the trials are not the same task; re-run one of them "
                                "with the other's setting")
        ta, tb = a[policy]["per_trial"], b[policy]["per_trial"]
        ka, kb = [(t["episode"], t["start"]) for t in ta], [(t["episode"], t["start"]) for t in tb]
        if ka != kb:  # in order: a trial set may hold one start twice (drawn with replacement), each its own trial
            raise UserError(f"pair {i + 1}: A and B ran different trials ({len(ka)} vs {len(kb)}, "
                            f"{len(set(ka) & set(kb))} starts in common): run both with the same --episodes, --seed "
                            "and --goal-offset on the same store")
        rows.extend(zip(ta, tb))
    dists = [k for k in rows[0][0] if k.startswith("final_")] if rows else []
    groups = sorted({x.get("group", "unknown") for x, _ in rows})
    return {
        "pairs": len(pairs), **_paired_counts(rows),
        "by_group": {g: _paired_counts([(x, y) for x, y in rows if x.get("group", "unknown") == g]) for g in groups}
        if len(groups) > 1 or groups != ["unknown"] else {},
        "distances": {k: {"mean_a": float(np.mean([x[k] for x, _ in rows])),
                          "mean_b": float(np.mean([y[k] for _, y in rows])),
                          "a_closer": sum(x[k] < y[k] for x, y in rows), "b_closer": sum(y[k] < x[k] for x, y in rows)}
                      for k in dists},
    }


def _paired_counts(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Successes of A and B on paired trials, the discordant ones and their exact McNemar p-value."""
    only_a = sum(x["success"] and not y["success"] for x, y in rows)
    only_b = sum(y["success"] and not x["success"] for x, y in rows)
    return {"trials": len(rows), "success_a": sum(x["success"] for x, _ in rows),
            "success_b": sum(y["success"] for _, y in rows),
            "both": sum(x["success"] and y["success"] for x, y in rows),
            "only_a": only_a, "only_b": only_b, "mcnemar_p": exact_mcnemar(only_a, only_b)}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Success rate, steps to success, the mean of every distance, smoothness and plan latency percentiles."""
    lat = [x for r in results for x in r["latencies"]]
    dists = [k for k in results[0] if k.startswith(("final_", "start_"))]
    return {
        "success_rate": float(np.mean([r["success"] for r in results])),
        "steps_to_success": float(np.mean([r["steps"] for r in results if r["success"]]))
        if any(r["success"] for r in results) else None,
        **{k: float(np.mean([r[k] for r in results])) for k in dists},
        "smoothness": float(np.mean([r["smoothness"] for r in results])),
        "latency_s": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))} if lat else None,
    }


def save_strip(trial: Trial, r: dict[str, Any], out: Path) -> Path:
    """A trial's PNG strip: the executed frames (every other one) and, last, the goal."""
    from PIL import Image

    frames = [np.concatenate(list(f), axis=0) for f in r["frames"][::2][:12] + [r["goal"]]]  # cameras stacked
    h, w = frames[0].shape[:2]
    canvas = np.full((h, (w + 2) * len(frames), 3), 255, dtype=np.uint8)
    for i, f in enumerate(frames):
        canvas[:, i * (w + 2):i * (w + 2) + w] = f
    path = Path(out) / f"trial_e{trial.episode}_t{trial.start}_{'success' if r['success'] else 'fail'}.png"
    with atomic_output(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path
