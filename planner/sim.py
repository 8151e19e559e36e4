"""`wmctl plan sim`: closed-loop MPC in a simulator (`planner.sims`) with the world model (DINO-WM protocol).

A trial starts from the simulator state of a held-out episode at frame t; the goal is the observation
reached by replaying that episode's recorded actions for `goal_offset` steps from there. MPC then plans in
latent space from the encoded observations, executes `execute` actions, and replans, for at most
`max_steps` steps. Success is the simulator's rule (pusht: DINO-WM's, agent and block positions within 20 px of
the goal state, norm over the four coordinates, and the block angle within pi/9), checked after every MPC step;
the trial ends there (the goal is reached). The same trials run with uniformly random actions, under the same rule.
The planner never sees the simulator: observations go through the frozen encoder, actions come out.

The cost is the latent distance to the goal averaged over every planned frame (`cost_frames="all"`), not
only the last: with a goal nearer than the horizon, a last-frame cost is indifferent to the path, so the
executed part of each plan wanders and the agent is rarely at the goal when it is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.reader import TokenReader
from pipeline.ingest import read_manifest
from pipeline.lerobot_io import DataFileCache, stack_column
from pipeline.stage import UserError
from planner.cem import CEMConfig, cem_plan, warm_start
from planner.core import ActionSpec, WorldModel, latent_cost
from planner.gd import GDConfig, gd_plan
from planner.offline import spec_for
from planner.sims import ENV_STATE_KEY, SIMULATORS, Simulator, make_sim

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
    execute_plan: str = "best"  # "best": the best sequence the planner found; "mean": CEM's final mean
    shift: str = "none"
    env: str = "pusht"
    device: str = "cpu"
    seed: int = 0
    save_strips: int = 3
    out: Path | None = None

    def __post_init__(self) -> None:
        if self.env not in SIMULATORS:
            raise UserError(f"--env {self.env!r}: only {', '.join(SIMULATORS)} is wired up")
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
    env_state: np.ndarray  # [5] state at the start
    actions: np.ndarray  # [goal_offset, 2] recorded absolute targets


def load_trials(root: Path, manifest_rows, cfg: SimConfig) -> list[Trial]:
    """Start states and recorded actions of held-out episodes (their LeRobot data files)."""
    data = DataFileCache(columns=[ENV_STATE_KEY, "action"])
    rng = np.random.default_rng(cfg.seed)
    rows = manifest_rows[(manifest_rows.split == "val") & manifest_rows.has_actions & (manifest_rows.status == "ok")]
    if rows.empty:
        raise UserError("the labelled source has no val episodes with actions; re-ingest with --val-fraction")
    trials = []
    order = rng.permutation(len(rows))
    i = 0
    while len(trials) < cfg.trials and i < 50 * cfg.trials:
        e = rows.iloc[order[i % len(rows)]]
        i += 1
        df = data.rows_in_file(Path(e.root) / e.data_file, int(e.episode_index))
        if ENV_STATE_KEY not in df:
            raise UserError(f"{e.root} has no {ENV_STATE_KEY}: the sim needs data recorded in the simulator "
                            "(`wmctl data pusht`)")
        if len(df) <= cfg.goal_offset:
            continue
        t = int(rng.integers(0, len(df) - cfg.goal_offset))
        st, acts = stack_column(df, ENV_STATE_KEY), stack_column(df, "action")
        trials.append(Trial(int(e.episode_index), t, st[t], acts[t:t + cfg.goal_offset]))
    if not trials:
        raise UserError(f"no val episode is longer than --goal-offset {cfg.goal_offset}")
    return trials


def run_trial(sim: Simulator, wm: WorldModel, encode: Callable[[np.ndarray, np.ndarray], torch.Tensor], trial: Trial,
              cfg: SimConfig, spec: ActionSpec, policy: str, rng: np.random.Generator) -> dict[str, Any]:
    """One MPC (or random) episode. Returns the outcome, the latencies and the frames.
    `encode(images [C, H, W, 3], robot_state)` gives the model's latents of an observation (the robot state is
    the dataset's `observation.state`, used by models with proprioception)."""
    sim.reset(trial.env_state)
    for a in trial.actions:
        goal_img = sim.step(a)
    goal_img = apply_shift(goal_img, cfg.shift)
    goal_state, goal_robot = sim.state(), sim.robot_state()
    img = apply_shift(sim.reset(trial.env_state), cfg.shift)
    start_state = sim.state()
    goal = encode(goal_img, goal_robot)  # [N, Z]; with proprio the robot state is one more token
    history = [encode(img, sim.robot_state())]
    executed: list[np.ndarray] = []  # model-space actions that led into each history frame after the first
    frames, latencies, plan_mean = [img], [], None
    fs = wm.actions.frameskip
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
            t0 = time.perf_counter()  # the latency includes committing the context
            rollout = wm.planning_rollout(ctx, context_actions_TA=ctx_actions, k=cfg.k, seed=seed)
            g = torch.Generator().manual_seed(seed)
            init = warm_start(plan_mean, cfg.execute, cfg.horizon, spec.dim)
            if cfg.planner == "cem":
                res = cem_plan(rollout, cost, spec, dataclasses.replace(cfg.cem, horizon=cfg.horizon), generator=g,
                               init_mean_HA=init, previous_A=prev)
            else:
                res = gd_plan(functools.partial(rollout, grad=True), cost, spec,
                              dataclasses.replace(cfg.gd, horizon=cfg.horizon), generator=g, init_mean_HA=init,
                              previous_A=prev)
            latencies.append(time.perf_counter() - t0)
            plan_mean = res.mean
            plan = (res.mean if cfg.execute_plan == "mean" else res.actions)[: cfg.execute].numpy()
        for a in plan:
            for step in wm.actions.frame_steps(a):
                img = apply_shift(sim.step(wm.actions.to_env(step, sim.robot_state())), cfg.shift)
            executed.append(np.asarray(a, dtype=np.float64))
            history.append(encode(img, sim.robot_state()))
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


def observation_encoder(wm: WorldModel, device: str) -> Callable[[np.ndarray, np.ndarray], torch.Tensor]:
    """`encode(images [C, H, W, 3], robot_state) -> latents [N, Z]` with the encoder the model was trained on."""
    from featurestore.encoders import encoder_for

    enc = encoder_for(wm.encoder, device)

    def encode(images: np.ndarray, robot_state: np.ndarray) -> torch.Tensor:
        patch = enc.encode(torch.from_numpy(np.ascontiguousarray(images)))["patch"]  # [C, P, Z]
        return wm.normalize(patch[0] if len(patch) == 1 else patch, robot_state)

    return encode


def labelled_source(reader: TokenReader) -> tuple[Any, int]:
    """The manifest rows of the store's first labelled source and its camera's image size (start states and goals
    come from its held-out episodes)."""
    labelled = [s for s in reader.store.sources() if reader.source_attrs(s).get("has_actions")]
    if not labelled:
        raise UserError(f"{reader.path} has no labelled source to take start states and goals from")
    attrs = reader.source_attrs(labelled[0])
    rows, meta = read_manifest(Path(attrs["manifest"]))
    return rows, int(meta["features"][attrs["cameras"][0]]["shape"][0])


def run_plan_sim(wm: WorldModel, cfg: SimConfig, *, store: Path,
                 encode_frame: Callable[[np.ndarray, np.ndarray], torch.Tensor] | None = None) -> dict[str, Any]:
    """Trials from the held-out episodes of the model's store, MPC and random actions on each; writes
    `cfg.out`/sim.json (and PNG strips) when `cfg.out` is set."""
    if wm.actions.frame_dim == 0:
        raise UserError("this model was trained without actions; the sim needs an action-conditioned model")
    rows, size = labelled_source(TokenReader(store))
    encode = encode_frame or observation_encoder(wm, cfg.device)
    trials = load_trials(Path(rows.iloc[0].root), rows, cfg)
    spec = spec_for(wm, cfg.max_delta_fraction)
    sim = make_sim(cfg.env, size)
    out: dict[str, Any] = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
                           "trials": len(trials)}
    strips = []
    try:
        for policy in ("model", "random"):
            rng = np.random.default_rng(cfg.seed)
            results = []
            for i, tr in enumerate(trials):
                r = run_trial(sim, wm, encode, tr, cfg, spec, policy, rng)
                log.info("%s trial %d/%d: success=%s %s", policy, i + 1, len(trials), r["success"],
                         ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k.startswith(("final_", "start_"))))
                if policy == "model" and i < cfg.save_strips:
                    strips.append((tr, r))
                results.append(r)
            out[policy] = summarize(results)
    finally:
        sim.close()
    if cfg.out is not None:
        if strips:
            out["strips"] = save_strips(strips, cfg.out)
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "sim.json").write_text(json.dumps(out, indent=2))
    return out


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


def save_strips(strips, out: Path) -> list[str]:
    """A PNG per saved trial: the executed frames (every other one) and, last, the goal."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for tr, r in strips:
        frames = [np.concatenate(list(f), axis=0) for f in r["frames"][::2][:12] + [r["goal"]]]  # cameras stacked
        h, w = frames[0].shape[:2]
        canvas = np.full((h, (w + 2) * len(frames), 3), 255, dtype=np.uint8)
        for i, f in enumerate(frames):
            canvas[:, i * (w + 2):i * (w + 2) + w] = f
        path = out / f"trial_e{tr.episode}_t{tr.start}_{'success' if r['success'] else 'fail'}.png"
        Image.fromarray(canvas).save(path)
        files.append(str(path))
    return files
