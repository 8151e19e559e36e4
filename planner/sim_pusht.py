"""`wmctl plan sim --env pusht`: closed-loop MPC in gym-pusht with the world model (DINO-WM protocol).

A trial starts from the simulator state of a held-out episode at frame t; the goal is the observation
reached by replaying that episode's recorded actions for `goal_offset` steps from there. MPC then plans in
latent space from the encoded observations, executes `execute` actions, and replans, for at most
`max_steps` steps. Success (DINO-WM's rule and protocol): after an MPC step, agent and block positions are
within 20 px of the goal state (norm over the four coordinates) and the block angle within pi/9; the trial
ends there (the goal is reached). The same trials run with uniformly random actions, under the same rule.
The planner never sees the simulator: observations go through the frozen encoder, actions come out.

The cost is the latent distance to the goal averaged over every planned frame (`cost_frames="all"`), not
only the last: with a goal nearer than the horizon, a last-frame cost is indifferent to the path, so the
executed part of each plan wanders and the agent is rarely at the goal when it is checked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.stage import UserError
from planner.cem import CEMConfig, cem_plan, warm_start
from planner.core import ActionSpec, WorldModel, latent_cost
from planner.gd import GDConfig, gd_plan
from planner.offline import spec_for

log = logging.getLogger(__name__)

SHIFTS = ("none", "lighting", "background")


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
    shift: str = "none"
    seed: int = 0
    save_strips: int = 3
    out: Path | None = None

    def __post_init__(self) -> None:
        if self.shift not in SHIFTS:
            raise UserError(f"--shift {self.shift!r}: choose one of {SHIFTS}")
        if self.planner not in ("cem", "gd"):
            raise UserError(f"--planner {self.planner!r}: choose cem or gd")
        if self.cost_frames not in ("all", "last"):
            raise UserError(f"--cost-frames {self.cost_frames!r}: choose all or last")


def success(goal_state: np.ndarray, state: np.ndarray) -> tuple[bool, float, float]:
    """DINO-WM's PushT rule: (success, position distance over agent+block xy, block angle distance)."""
    pos = float(np.linalg.norm(goal_state[:4] - state[:4]))
    ang = abs(float(goal_state[4] - state[4])) % (2 * math.pi)
    ang = min(ang, 2 * math.pi - ang)
    return pos < 20.0 and ang < math.pi / 9, pos, ang


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
    env_state: np.ndarray  # [5] state at the start
    actions: np.ndarray  # [goal_offset, 2] recorded absolute targets


def load_trials(root: Path, manifest_rows, cfg: SimConfig) -> list[Trial]:
    """Start states and recorded actions of held-out episodes (their LeRobot data files)."""
    from pipeline.demodata.pusht import ENV_STATE_KEY
    from pipeline.lerobot_io import DataFileCache, stack_column

    data = DataFileCache(columns=[ENV_STATE_KEY, "action"])
    rng = np.random.default_rng(cfg.seed)
    rows = manifest_rows[(manifest_rows.split == "val") & manifest_rows.has_actions & (manifest_rows.status == "ok")]
    if rows.empty:
        raise UserError("the labelled pusht source has no val episodes with actions; re-ingest with --val-fraction")
    trials = []
    order = rng.permutation(len(rows))
    i = 0
    while len(trials) < cfg.trials and i < 50 * cfg.trials:
        e = rows.iloc[order[i % len(rows)]]
        i += 1
        df = data.rows_in_file(Path(e.root) / e.data_file, int(e.episode_index))
        if ENV_STATE_KEY not in df:
            raise UserError(f"{e.root} has no {ENV_STATE_KEY}: the sim needs pusht data from `wmctl data pusht`")
        if len(df) <= cfg.goal_offset:
            continue
        t = int(rng.integers(0, len(df) - cfg.goal_offset))
        st, acts = stack_column(df, ENV_STATE_KEY), stack_column(df, "action")
        trials.append(Trial(int(e.episode_index), t, st[t], acts[t:t + cfg.goal_offset]))
    if not trials:
        raise UserError(f"no val episode is longer than --goal-offset {cfg.goal_offset}")
    return trials


class PushtSim:
    """gym-pusht with reset-to-state, rendering at the dataset's image size."""

    def __init__(self, size: int):
        from pipeline.demodata.pusht import env_state, make_env

        self.env, self._state = make_env(size), env_state

    def reset(self, state: np.ndarray) -> np.ndarray:
        obs, _ = self.env.reset(options={"reset_to_state": np.asarray(state, dtype=np.float64)})
        return obs["pixels"]

    def step(self, target_xy: np.ndarray) -> np.ndarray:
        obs, *_ = self.env.step(np.clip(target_xy, 0.0, 512.0))
        return obs["pixels"]

    def state(self) -> np.ndarray:
        return self._state(self.env)

    def close(self) -> None:
        self.env.close()


def to_env_action(a_model: np.ndarray, agent_xy: np.ndarray, mode: str) -> np.ndarray:
    return a_model[:2] + agent_xy if mode == "relative_to_state" else a_model[:2]


def run_trial(sim: PushtSim, wm: WorldModel, encode: Callable[[np.ndarray, np.ndarray], torch.Tensor], trial: Trial,
              cfg: SimConfig, spec: ActionSpec, policy: str, rng: np.random.Generator) -> dict[str, Any]:
    """One MPC (or random) episode. Returns the outcome, the latencies and the frames.
    `encode(image, agent_xy)` gives the model's latents of an observation (agent_xy is pusht's
    `observation.state`, used by models with proprioception)."""
    sim.reset(trial.env_state)
    for a in trial.actions:
        goal_img = sim.step(a)
    goal_img = apply_shift(goal_img, cfg.shift)
    goal_state = sim.state()
    img = apply_shift(sim.reset(trial.env_state), cfg.shift)
    start_state = sim.state()
    goal = encode(goal_img, goal_state[:2])  # [N, Z]; the proprio state is the agent's position
    history = [encode(img, start_state[:2])]
    executed: list[np.ndarray] = []  # model-space actions that led into each history frame after the first
    frames, latencies, plan_mean = [img], [], None
    fs = wm.frameskip
    lo, hi = np.array(spec.low), np.array(spec.high)
    weights = torch.ones(cfg.horizon) if cfg.cost_frames == "all" else None
    cost = latent_cost(goal, state_dim=wm.state_dim, state_weight=cfg.state_weight, frame_weights=weights)
    while len(executed) * fs < cfg.max_steps:
        if policy == "random":
            plan = lo + (hi - lo) * rng.random((cfg.execute, spec.dim))
        else:
            ctx = torch.stack(history[-cfg.context:])
            acts = [np.zeros(spec.dim)] + executed
            ctx_actions = torch.as_tensor(np.stack(acts[-len(ctx):]), dtype=torch.float32)
            prev = torch.as_tensor(executed[-1], dtype=torch.float32) if executed else None
            seed = int(rng.integers(2**31))

            def rollout(a_SHA, grad=False, ctx=ctx, ctx_actions=ctx_actions, seed=seed):
                return wm.plan_rollout(ctx, a_SHA, grad=grad, context_actions_TA=ctx_actions, k=cfg.k, seed=seed)

            g = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            init = warm_start(plan_mean, cfg.execute, cfg.horizon, spec.dim)
            if cfg.planner == "cem":
                res = cem_plan(rollout, cost, spec, dataclasses.replace(cfg.cem, horizon=cfg.horizon), generator=g,
                               init_mean_HA=init, previous_A=prev)
            else:
                res = gd_plan(lambda a: rollout(a, grad=True), cost, spec,
                              dataclasses.replace(cfg.gd, horizon=cfg.horizon), generator=g, init_mean_HA=init,
                              previous_A=prev)
            latencies.append(time.perf_counter() - t0)
            plan_mean, plan = res.mean, res.actions[: cfg.execute].numpy()
        for a in plan:
            for j in range(fs):
                img = apply_shift(sim.step(to_env_action(a[2 * j:2 * j + 2], sim.state()[:2], wm.action_mode)),
                                  cfg.shift)
            executed.append(np.asarray(a, dtype=np.float64))
            history.append(encode(img, sim.state()[:2]))
            frames.append(img)
            if len(executed) * fs >= cfg.max_steps:
                break
        if success(goal_state, sim.state())[0]:
            break  # the goal is reached: the trial ends
    final = sim.state()
    ok, pos, ang = success(goal_state, final)
    _, pos0, _ = success(goal_state, start_state)
    steps = np.diff(np.stack(executed), axis=0) if len(executed) > 1 else np.zeros((1, spec.dim))
    return {"success": ok, "steps": len(executed) * fs, "final_pos_dist": pos,
            "final_angle_dist": ang, "start_pos_dist": pos0,
            "final_agent_dist": float(np.linalg.norm(goal_state[:2] - final[:2])),
            "final_block_dist": float(np.linalg.norm(goal_state[2:4] - final[2:4])),
            "smoothness": float(np.linalg.norm(steps, axis=1).mean()), "latencies": latencies,
            "frames": frames, "goal": goal_img}


def run_plan_sim(wm: WorldModel, encode_frame: Callable[[np.ndarray, np.ndarray], torch.Tensor], root_rows, size: int,
                 cfg: SimConfig) -> dict[str, Any]:
    if wm.frame_action_dim == 0:
        raise UserError("this model was trained without actions; the sim needs an action-conditioned model")
    trials = load_trials(Path(root_rows.iloc[0].root), root_rows, cfg)
    spec = spec_for(wm, cfg.max_delta_fraction)
    sim = PushtSim(size)
    out: dict[str, Any] = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
                           "trials": len(trials)}
    strips = []
    try:
        for policy in ("model", "random"):
            rng = np.random.default_rng(cfg.seed)
            results = []
            for i, tr in enumerate(trials):
                r = run_trial(sim, wm, encode_frame, tr, cfg, spec, policy, rng)
                log.info("%s trial %d/%d: success=%s final position distance %.1f px (start %.1f; agent %.1f, "
                         "block %.1f)", policy, i + 1, len(trials), r["success"], r["final_pos_dist"],
                         r["start_pos_dist"], r["final_agent_dist"], r["final_block_dist"])
                if policy == "model" and i < cfg.save_strips:
                    strips.append((tr, r))
                results.append(r)
            lat = [x for r in results for x in r["latencies"]]
            out[policy] = {
                "success_rate": float(np.mean([r["success"] for r in results])),
                "steps_to_success": float(np.mean([r["steps"] for r in results if r["success"]]))
                if any(r["success"] for r in results) else None,
                "final_pos_dist": float(np.mean([r["final_pos_dist"] for r in results])),
                "final_angle_dist": float(np.mean([r["final_angle_dist"] for r in results])),
                "final_agent_dist": float(np.mean([r["final_agent_dist"] for r in results])),
                "final_block_dist": float(np.mean([r["final_block_dist"] for r in results])),
                "start_pos_dist": float(np.mean([r["start_pos_dist"] for r in results])),
                "smoothness": float(np.mean([r["smoothness"] for r in results])),
                "latency_s": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))} if lat
                else None,
            }
    finally:
        sim.close()
    if cfg.out is not None and strips:
        out["strips"] = save_strips(strips, cfg.out)
    return out


def save_strips(strips, out: Path) -> list[str]:
    """A PNG per saved trial: the executed frames (every other one) and, last, the goal."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for tr, r in strips:
        frames = r["frames"][::2][:12] + [r["goal"]]
        h, w = frames[0].shape[:2]
        canvas = np.full((h, (w + 2) * len(frames), 3), 255, dtype=np.uint8)
        for i, f in enumerate(frames):
            canvas[:, i * (w + 2):i * (w + 2) + w] = f
        path = out / f"trial_e{tr.episode}_t{tr.start}_{'success' if r['success'] else 'fail'}.png"
        Image.fromarray(canvas).save(path)
        files.append(str(path))
    return files
