"""`wmctl plan offline`: plan from frame t to the encoded frame t+H on labelled val episodes.

For each (episode, t): plan H frames of actions towards the goal latents, and report the latent distance to the
goal for the plan, for the ground-truth actions and for random actions in the same bounds, and the error of
the planned actions against the ground truth (in units of the training actions' std, the one score that
needs no model). Distances come from up to three scorers, labelled: the planning model with the very noise
the plan was optimised on (`model_same_noise`: flattering, "closer than random" is near-guaranteed), the
planning model under fresh noise (a seed the planner never saw), and another model (`--judge`, e.g. a
baseline) with its own normalisation and goal.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.encoders import check_same_encoder
from featurestore.reader import TokenReader, Window
from pipeline.stage import UserError, atomic_write_json
from planner.cem import CEMConfig, cem_plan, cem_preset
from planner.core import ActionSpec, WorldModel, dtype_name, latent_cost
from planner.gd import GDConfig, gd_plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class OfflineConfig:
    goal_offset: int = 5  # H: frames from the start to the goal
    context: int = 2  # frames of history given to the model (the last is frame t)
    starts_per_episode: int = 2
    episodes: int | None = None
    planner: str = "cem"  # cem | gd
    cem: CEMConfig = CEMConfig()
    gd: GDConfig = GDConfig()
    smoothness: float = 0.0
    state_weight: float = 1.0  # with proprioception: weight of the state's distance to the goal state
    random_samples: int = 64
    k: int = 4
    seed: int = 0
    split: str = "val"
    judge: WorldModel | None = None  # another model scores the plans too (same action space)
    out: Path | None = None  # writes <out>/offline_<planner>.json when set (`wmctl plan offline` checks it first)


def search_configs(planner: str, horizon: int, preset: str = "default", **cem: Any) -> tuple[CEMConfig, GDConfig]:
    """The planners' settings: CEM from a named budget (`planner.cem.CEM_PRESETS`) with `cem` fields over it; GD
    with one restart per 16 CEM samples and 4x the iterations (a gradient step is cheaper than a CEM iteration)."""
    if planner not in ("cem", "gd"):
        raise UserError(f"--planner {planner!r}: choose cem or gd")
    try:
        c = cem_preset(preset, horizon=horizon, **cem)
    except ValueError as e:
        raise UserError(f"--cem {preset}: {e}") from None
    return c, GDConfig(horizon=horizon, restarts=max(1, c.samples // 16), iterations=c.iterations * 4)


def spec_for(wm: WorldModel, max_delta_fraction: float | None = 0.5) -> ActionSpec:
    """Bounds from the model's training actions; per-step changes limited to a fraction of the range."""
    lo, hi = wm.actions.bounds()
    md = tuple(float(x) for x in (hi - lo) * max_delta_fraction) if max_delta_fraction else None
    return ActionSpec(tuple(float(x) for x in lo), tuple(float(x) for x in hi), md)


def run_plan_offline(wm: WorldModel, reader: TokenReader, cfg: OfflineConfig) -> dict[str, Any]:
    if wm.actions.frame_dim == 0:
        raise UserError("this model was trained without actions; planning needs an action-conditioned model")
    check_same_encoder(wm.encoder, reader.encoder, what="the model", fix=f"plan on a store made with the encoder "
                       f"the model was trained on, not {reader.path}")
    fs, H = wm.actions.frameskip, cfg.goal_offset
    ctx = max(1, min(cfg.context, wm.window - H))
    eps = reader.episodes
    eps = eps[(eps.split == cfg.split) & (eps.view == 0) & eps.has_actions]
    need = (ctx - 1 + H) * fs + 1
    eps = eps[eps.length >= need]
    if eps.empty:
        raise UserError(f"no labelled {cfg.split} episode has the {need} frames that {ctx} context frames and a "
                        f"goal {H} frames ahead need (frameskip {fs}); lower --goal-offset")
    if cfg.episodes:
        eps = eps.iloc[: cfg.episodes]
    if cfg.judge is not None:
        _check_judge(wm, cfg.judge, reader)
    spec = spec_for(wm)
    rng = np.random.default_rng(cfg.seed)
    rows, latencies = [], []
    base = wm
    for row, e in eps.iterrows():
        wm = base.for_source(reader, str(e.source))  # that source's cameras (another robot's may be fewer)
        judge = cfg.judge.for_source(reader, str(e.source)) if cfg.judge is not None else None
        for s0 in np.sort(rng.choice(int(e.length) - need + 1, size=min(cfg.starts_per_episode,
                                                                        int(e.length) - need + 1), replace=False)):
            w = reader.read(Window(int(row), int(s0), ctx + H, fs), ("patch", "state"))
            raw = reader.read(Window(int(row), int(s0), need), ("action", "state"))
            z = wm.normalize(w["patch"], w["state"])  # [ctx+H, N, Z]
            steps = wm.actions.from_dataset(raw["action"][: need - 1].astype(np.float64), raw["state"][: need - 1])
            acts = torch.as_tensor(wm.actions.per_frame(steps), dtype=torch.float32)  # [(ctx-1+H), A] between frames
            ctx_actions = torch.cat([torch.zeros(1, acts.shape[1]), acts[: ctx - 1]])  # leading into ctx frames
            gt = acts[ctx - 1:]  # [H, A] the actions from frame t to t+H
            cost = latent_cost(z[-1], smoothness=cfg.smoothness, state_dim=wm.state_dim,
                               state_weight=cfg.state_weight)
            seed, fresh_seed = (int(x) for x in rng.integers(2**31, size=2))
            t0 = time.perf_counter()  # the latency includes committing the context
            rollout = wm.planning_rollout(z[:ctx], context_actions_TA=ctx_actions, k=cfg.k, seed=seed)
            g = torch.Generator().manual_seed(seed)
            if cfg.planner == "cem":
                res = cem_plan(rollout, cost, spec, dataclasses.replace(cfg.cem, horizon=H), generator=g)
            else:
                res = gd_plan(functools.partial(rollout, grad=True), cost, spec, dataclasses.replace(cfg.gd, horizon=H),
                              generator=g)
            latencies.append(time.perf_counter() - t0)
            lo, hi, _ = spec.tensors()
            rand = lo + (hi - lo) * torch.rand((cfg.random_samples, H, spec.dim), generator=g)
            scorers = {"model_same_noise": (rollout, cost),
                       "model_fresh_noise": (wm.planning_rollout(z[:ctx], context_actions_TA=ctx_actions, k=cfg.k,
                                                                 seed=fresh_seed), cost)}
            if judge is not None:
                zj = judge.normalize(w["patch"], w["state"])
                scorers["judge"] = (judge.planning_rollout(zj[:ctx], context_actions_TA=ctx_actions, k=cfg.k,
                                                           seed=fresh_seed),
                                    latent_cost(zj[-1], smoothness=cfg.smoothness, state_dim=judge.state_dim,
                                                state_weight=cfg.state_weight))
            std = (hi - lo) / 5.0  # the bounds are mean +- 2.5 std
            rec = {"episode": int(e.episode_index), "start": int(s0),
                   "action_error": float((((res.actions - gt) / std) ** 2).mean()),
                   "random_action_error": float((((rand - gt) / std) ** 2).mean())}
            with torch.no_grad():
                for name, (roll, c) in scorers.items():
                    d_rand = c(roll(rand), rand).tolist()
                    rec[name] = {"plan": float(c(roll(res.actions[None]), res.actions[None])[0]),
                                 "ground_truth": float(c(roll(gt[None]), gt[None])[0]),
                                 "random_mean": statistics.fmean(d_rand), "random_best": min(d_rand)}
            rows.append(rec)

    def mean(key):
        return statistics.fmean(r[key] for r in rows)

    scored = [k for k in ("model_same_noise", "model_fresh_noise", "judge") if k in rows[0]]
    result = {
        "planner": cfg.planner, "goal_offset": H, "context": ctx, "problems": len(rows),
        "random_samples": cfg.random_samples,
        "dtype": dtype_name(wm.dtype),
        "judge": getattr(cfg.judge, "name", None),
        # latent distance to the goal, per scorer (see the module doc): which model, which noise
        "latent_distance": {s_: {k: statistics.fmean(r[s_][k] for r in rows)
                                 for k in ("plan", "ground_truth", "random_mean", "random_best")} for s_ in scored},
        "plan_closer_than_random": {s_: statistics.fmean(r[s_]["plan"] < r[s_]["random_mean"] for r in rows)
                                    for s_ in scored},
        "action_error_vs_ground_truth": {"plan": mean("action_error"), "random": mean("random_action_error")},
        "latency_s": {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95))},
        "rows": rows,
    }
    if cfg.out is not None:
        atomic_write_json(Path(cfg.out) / f"offline_{cfg.planner}.json", result)
        result["out"] = str(Path(cfg.out) / f"offline_{cfg.planner}.json")
    return result


def _check_judge(wm: WorldModel, judge: WorldModel, reader: TokenReader) -> None:
    """A judge scores the planning model's actions as they are: it must read the same store and take actions
    in the same space (mode, frameskip, width)."""
    check_same_encoder(judge.encoder, reader.encoder, what="the judge", fix="judge with a model trained on a "
                       f"store made with the encoder of {reader.path}")
    a, b = wm.actions, judge.actions
    if (a.mode, a.frameskip, a.frame_dim) != (b.mode, b.frameskip, b.frame_dim):
        raise UserError(f"--judge {getattr(judge, 'name', judge)} takes {b.mode} actions at frameskip {b.frameskip} "
                        f"({b.frame_dim} wide), the planning model {a.mode} at frameskip {a.frameskip} "
                        f"({a.frame_dim} wide): judge with a model trained on the same action space")
