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
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.encoders import check_same_encoder
from featurestore.reader import TokenReader, Window
from pipeline.stage import UserError, atomic_write_json, to_jsonable
from planner.cem import CEMConfig
from planner.core import ActionSpec, WorldModel, dtype_name, latent_cost
from planner.gd import GDConfig
from planner.planners import plan, settings, spec_for
from planner.proposal import Observation
from planner.results import Latency


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class OfflineResult:
    """What `wmctl plan offline` returns and writes (offline_<planner>.json). `latent_distance` and
    `plan_closer_than_random` per scorer (model_same_noise, model_fresh_noise, judge: see the module doc);
    `rows`: one record per problem (episode, start, action errors, each scorer's distances)."""

    planner: str
    goal_offset: int
    context: int
    problems: int
    random_samples: int
    dtype: str
    judge: str | None  # the judge's name, if one scored the plans too
    latent_distance: dict[str, dict[str, float]]  # {scorer: {plan, ground_truth, random_mean, random_best}}
    plan_closer_than_random: dict[str, float]  # {scorer: share of problems}
    action_error_vs_ground_truth: dict[str, float]  # {plan, random}: in units of the training actions' std
    latency_s: Latency
    rows: list[dict[str, Any]]
    out: str | None = None  # where it was written (not in the file)

    def to_json(self) -> dict[str, Any]:
        """offline_<planner>.json's content, exactly."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "out"}
        return to_jsonable({**d, "latency_s": self.latency_s.to_json()})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OfflineResult:
        return cls(**{**d, "latency_s": Latency.from_json(d["latency_s"])})


def run_plan_offline(wm: WorldModel, reader: TokenReader, cfg: OfflineConfig, *,
                     on_total: Callable[[int], None] | None = None,
                     on_progress: Callable[[int], None] | None = None) -> OfflineResult:
    """Plan each problem (episode, start) of the labelled `cfg.split` episodes and score it (see the module doc);
    writes <out>/offline_<planner>.json when `cfg.out` is set. `on_total(problems)` once they are known,
    `on_progress(1)` as each is planned and scored."""
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
    view = wm
    starts = [min(cfg.starts_per_episode, int(e.length) - need + 1) for e in eps.itertuples()]
    if on_total is not None:
        on_total(sum(starts))
    for (row, e), n in zip(eps.iterrows(), starts):
        view = wm.for_source(reader, str(e.source))  # that source's cameras (another robot's may be fewer)
        judge = cfg.judge.for_source(reader, str(e.source)) if cfg.judge is not None else None
        for s0 in np.sort(rng.choice(int(e.length) - need + 1, size=n, replace=False)):
            w = reader.read(Window(int(row), int(s0), ctx + H, fs), ("patch", "state"))
            raw = reader.read(Window(int(row), int(s0), need), ("action", "state"))
            rec, latency = _problem(view, judge, w, raw, ctx, spec, rng, cfg)
            rows.append({"episode": int(e.episode_index), "start": int(s0), **rec})
            latencies.append(latency)
            if on_progress is not None:
                on_progress(1)
    result = _summary(rows, latencies, cfg, ctx, dtype_name(view.dtype))
    if cfg.out is not None:
        path = Path(cfg.out) / f"offline_{cfg.planner}.json"
        atomic_write_json(path, result.to_json())
        result = dataclasses.replace(result, out=str(path))
    return result


def _problem(wm: WorldModel, judge: WorldModel | None, w: dict, raw: dict, ctx: int, spec: ActionSpec,
             rng: np.random.Generator, cfg: OfflineConfig) -> tuple[dict[str, Any], float]:
    """One problem: plan from the first `ctx` frames of window `w` to its last, against the ground-truth actions
    (`raw`: the window's per-step actions and states) and random ones. Returns its record and the plan latency."""
    H = cfg.goal_offset
    need = (ctx - 1 + H) * wm.actions.frameskip + 1  # the frames of `raw`
    z = wm.normalize(w["patch"], w["state"])  # [ctx+H, N, Z]
    steps = wm.actions.from_dataset(raw["action"][: need - 1].astype(np.float64), raw["state"][: need - 1])
    acts = torch.as_tensor(wm.actions.per_frame(steps), dtype=torch.float32)  # [(ctx-1+H), A] between frames
    ctx_actions = torch.cat([torch.zeros(1, acts.shape[1]), acts[: ctx - 1]])  # leading into ctx frames
    gt = acts[ctx - 1:]  # [H, A] the actions from frame t to t+H
    cost = latent_cost(z[-1], smoothness=cfg.smoothness, state_dim=wm.state_dim, state_weight=cfg.state_weight)
    seed, fresh_seed = (int(x) for x in rng.integers(2**31, size=2))
    t0 = time.perf_counter()  # the latency includes committing the context
    rollout = wm.planning_rollout(z[:ctx], context_actions_TA=ctx_actions, k=cfg.k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    res = plan(cfg.planner, rollout, cost, spec, settings(cfg.planner, cfg), horizon=H, generator=g,
               observation=Observation(wm, z[ctx - 1], z[-1]))
    latency = time.perf_counter() - t0
    lo, hi, _ = spec.tensors()
    rand = lo + (hi - lo) * torch.rand((cfg.random_samples, H, spec.dim), generator=g)
    scorers = {"model_same_noise": (rollout, cost),
               "model_fresh_noise": (wm.planning_rollout(z[:ctx], context_actions_TA=ctx_actions, k=cfg.k,
                                                         seed=fresh_seed), cost)}
    if judge is not None:
        zj = judge.normalize(w["patch"], w["state"])
        scorers["judge"] = (judge.planning_rollout(zj[:ctx], context_actions_TA=ctx_actions, k=cfg.k, seed=fresh_seed),
                            latent_cost(zj[-1], smoothness=cfg.smoothness, state_dim=judge.state_dim,
                                        state_weight=cfg.state_weight))
    std = (hi - lo) / 5.0  # the bounds are mean +- 2.5 std
    rec = {"action_error": float((((res.actions - gt) / std) ** 2).mean()),
           "random_action_error": float((((rand - gt) / std) ** 2).mean())}
    with torch.no_grad():
        for name, (roll, c) in scorers.items():
            d_rand = c(roll(rand), rand).tolist()
            rec[name] = {"plan": float(c(roll(res.actions[None]), res.actions[None])[0]),
                         "ground_truth": float(c(roll(gt[None]), gt[None])[0]),
                         "random_mean": statistics.fmean(d_rand), "random_best": min(d_rand)}
    return rec, latency


def _summary(rows: list[dict[str, Any]], latencies: list[float], cfg: OfflineConfig, ctx: int, dtype: str
             ) -> OfflineResult:
    """The problems' means: latent distances and how often the plan beats random per scorer, action errors."""
    def mean(key):
        return statistics.fmean(r[key] for r in rows)

    scored = [k for k in ("model_same_noise", "model_fresh_noise", "judge") if k in rows[0]]
    return OfflineResult(
        planner=cfg.planner, goal_offset=cfg.goal_offset, context=ctx, problems=len(rows),
        random_samples=cfg.random_samples, dtype=dtype, judge=getattr(cfg.judge, "name", None),
        # latent distance to the goal, per scorer (see the module doc): which model, which noise
        latent_distance={s_: {k: statistics.fmean(r[s_][k] for r in rows)
                              for k in ("plan", "ground_truth", "random_mean", "random_best")} for s_ in scored},
        plan_closer_than_random={s_: statistics.fmean(r[s_]["plan"] < r[s_]["random_mean"] for r in rows)
                                 for s_ in scored},
        action_error_vs_ground_truth={"plan": mean("action_error"), "random": mean("random_action_error")},
        latency_s=Latency.of(latencies), rows=rows)


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
