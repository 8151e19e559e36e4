"""`run_eval`: how far ahead can the model be trusted, with and without actions, against baselines?

On held-out episodes: from each context, roll out h frames and compare with the encoded truth at
horizons 1, 5, 10, 20 for (a) labelled clips with their actions, (b) the same clips with the null action,
(c) action-free clips; copy-last and any other checkpoint (the `dinowm` teacher-forced baseline, the
deterministic control) on the same windows; error against the number of sampling steps K; and a linear probe
from latents to proprio state (fit on train, R^2 on val, for true and predicted latents).

A sampler is scored as one: N samples per window (`samples`; 1 for deterministic models), the MSE of their
mean (what a deterministic model's MSE compares with), the mean single-sample MSE (the mean's MSE plus the
predictive variance) and the energy score (a proper score of the sample set: it rewards the right spread and
penalises both over- and under-dispersion), on all patch tokens, on the "moving" tokens (the top fraction by
true change since the last context frame: static background cannot hide a wrong moving part) and per camera.
Rollouts never leave the trained regime: past the training window they slide it (`trainer.sampling`).
Every model reads the raw tokens through its own statistics; errors are measured in the evaluated model's
normalisation. Deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.encoders import check_same_encoder
from featurestore.reader import TokenReader
from pipeline.machine import resolve_device
from pipeline.stage import UserError
from trainer.api import LoadedWorldModel
from trainer.eval.config import EvalConfig
from trainer.eval.metrics import action_effect, errors, pool, state_distance, with_calibrated_noise
from trainer.eval.output import output_folders, write_result
from trainer.eval.probe import proprio_probe, scene_probe
from trainer.eval.result import EvalResult, KSweep
from trainer.eval.windows import Windows, calibrate_noise, collect_windows, sample_set, samples_of

# (condition, the window group it is scored on, whether the model sees the actions)
Plan = list[tuple[str, list[Windows], bool]]


@dataclasses.dataclass(frozen=True)
class _Scoring:
    """What every score of one eval shares: its config, the context length, each model's view of each source (its
    cameras) and each source's camera names."""

    cfg: EvalConfig
    ctx: int
    views: dict[tuple[str, str], LoadedWorldModel]
    cams: dict[str, list[str]]
    on_progress: Callable[[int], None] | None = None  # told the windows of each window group once scored

    def scored(self, win: Windows) -> None:
        if self.on_progress is not None:
            self.on_progress(len(win.tokens))

    @property
    def idx(self) -> list[int]:
        return [h - 1 for h in self.cfg.horizons]

    def score(self, m: LoadedWorldModel, win: Windows, samples: np.ndarray, states: np.ndarray | None = None
              ) -> dict[str, Any]:
        """`m`'s scores of a sample set on `win` (and, with proprioception, of the robot states it predicts)."""
        cfg, ctx, idx = self.cfg, self.ctx, self.idx
        truth, last = win.tokens[:, ctx:][:, idx], win.tokens[:, ctx - 1]
        out = errors(m, samples, truth, last, cfg.horizons, moving_fraction=cfg.moving_fraction,
                     cameras=self.cams[win.source])
        if states is not None:  # where the model says the robot goes (models with proprioception)
            out["state_dist"] = state_distance(states, win.frame_states[:, ctx:][:, idx], cfg.horizons)
        return out

    def samples_for(self, m: LoadedWorldModel, win: Windows, use: bool, k: int, states: bool = False):
        return sample_set(self.views[(m.name, win.source)], win, self.ctx, self.cfg, use_actions=use, k=k,
                          states=states)


def _same_encoder(reader: TokenReader, wm: LoadedWorldModel) -> None:
    check_same_encoder(wm.encoder, reader.encoder, what=wm.name,
                       fix=f"evaluate on a store made with the encoder {wm.name} was trained on")


def _load(cfg: EvalConfig) -> tuple[LoadedWorldModel, list[LoadedWorldModel], TokenReader]:
    """The model, its baselines (checked: the store's encoder, one rate) and the store's reader."""
    device = str(resolve_device(cfg.device))
    wm = LoadedWorldModel.load(cfg.ckpt, weights=cfg.weights, device=device)
    reader = TokenReader(cfg.store or wm.store)
    _same_encoder(reader, wm)
    baselines = [LoadedWorldModel.load(b, weights=cfg.weights, device=device) for b in cfg.baselines]
    for b in baselines:
        _same_encoder(reader, b)
        skips = lambda m: (m.cfg.frameskip, dict(m.cfg.source_frameskip))  # noqa: E731
        if skips(b) != skips(wm):
            raise UserError(f"baseline {b.name} uses frameskip {b.cfg.frameskip} "
                            f"{dict(b.cfg.source_frameskip) or ''}, the model {wm.cfg.frameskip} "
                            f"{dict(wm.cfg.source_frameskip) or ''}: compare models trained at one rate")
    return wm, baselines, reader


def run_eval(cfg: EvalConfig, *, on_total: Callable[[int], None] | None = None,
             on_progress: Callable[[int], None] | None = None) -> EvalResult:
    """Score the model, copy-last and the baselines on the same windows; write eval.json (and plots, rollout grids,
    the tracker's figures). See the module doc. Progress in windows scored (every condition's, then the K sweep's):
    `on_total(windows)` once they are drawn, `on_progress(n)` as each group of n is scored."""
    t0 = time.monotonic()
    out, track = output_folders(cfg)
    wm, baselines, reader = _load(cfg)
    ctx = cfg.context or max(1, wm.window // 2)
    k_sweep = cfg.k_sweep or tuple(2**i for i in range(0, 5) if 2**i <= wm.cfg.model.k_max)
    if wm.sampler and (cfg.k > wm.cfg.model.k_max or cfg.k & (cfg.k - 1)):
        raise UserError(f"--k {cfg.k} must be a power of two <= k_max {wm.cfg.model.k_max}")
    wins = collect_windows(reader, wm, cfg, ctx)
    srcs = sorted({w.source for groups in wins.values() for w in groups})
    models = (wm, *baselines)
    views = {(m.name, src): m.for_source(reader, src) for m in models for src in srcs}
    sc = _Scoring(cfg, ctx, views, {src: camera_names(reader, views[(wm.name, src)], src) for src in srcs},
                  on_progress)
    plan = _plan(wins, wm)
    if on_total is not None:
        on_total(_windows_to_score(plan, k_sweep if wm.sampler else ()))
    calibration = {bl.name: calibrate_noise(reader, bl, views, cfg, ctx) for bl in baselines
                   if not bl.sampler and cfg.samples > 1 and "labelled" in wins}
    conditions, per_source, preds, sample_means = _score_conditions(sc, wm, baselines, plan, calibration)
    sweep = _k_sweep(sc, wm, plan[0], k_sweep) if wm.sampler and plan else None
    effect = {m.name: action_effect(m, sample_means[(m.name, "actions")], sample_means[(m.name, "null_action")],
                                    wins["labelled"], ctx, sc.idx, cfg.horizons)
              for m in models if (m.name, "null_action") in sample_means} \
        if "labelled" in wins and wm.shape.action_dim and cfg.action_effect else None
    probes = (proprio_probe(reader, wm, cfg, wins, preds, ctx), scene_probe(reader, views, wm, srcs, cfg)) \
        if cfg.probe else (None, None)
    result = EvalResult(
        model=wm.name, kind=wm.kind, store=str(cfg.store or wm.store), context=ctx, horizons=list(cfg.horizons),
        k=cfg.k, split=cfg.split, weights=cfg.weights, seed=cfg.seed,
        samples={m.name: samples_of(m, cfg) for m in models}, moving_fraction=cfg.moving_fraction,
        cameras=list(dict.fromkeys(c for src in srcs for c in sc.cams[src])), source_cameras=sc.cams,
        trained_window=wm.cfg.max_context(),  # training's window: longer rollouts slide it (trainer.sampling)
        context_used={m.name: min(ctx, m.max_context_frames) for m in models},  # DINO-WM: its last 3 frames
        slides_after_horizon={m.name: max(0, m.window - ctx) for m in models},
        windows={name: sum(len(w.tokens) for w in groups) for name, groups in wins.items()}, conditions=conditions,
        per_source=per_source, splits=_splits(reader), k_sweep=sweep, action_effect=effect, probe=probes[0],
        scene_probe=probes[1], seconds=time.monotonic() - t0)
    return write_result(cfg, wm, reader, result, out, track, min(max(cfg.horizons), 20))


def _windows_to_score(plan: Plan, k_sweep: tuple[int, ...]) -> int:
    """The windows eval scores: each condition's, then the first condition's once per K of the sweep."""
    per_condition = [sum(len(w.tokens) for w in groups) for _, groups, _ in plan]
    return sum(per_condition) + (len(k_sweep) * per_condition[0] if per_condition else 0)


def _plan(wins: dict[str, list[Windows]], wm: LoadedWorldModel) -> Plan:
    """The conditions to score: with and without the actions on labelled windows (without only, for a model
    trained without actions), the null action on action-free ones."""
    plan: Plan = []
    if "labelled" in wins and wm.shape.action_dim:
        plan += [("actions", wins["labelled"], True), ("null_action", wins["labelled"], False)]
    elif "labelled" in wins:
        plan += [("null_action", wins["labelled"], False)]
    if "free" in wins:
        plan += [("action_free", wins["free"], False)]
    return plan


def _score_conditions(sc: _Scoring, wm: LoadedWorldModel, baselines: list[LoadedWorldModel], plan: Plan,
                      calibration: dict[str, np.ndarray]):
    """Per condition: every model on each source's windows (its own cameras), then pooled over windows. Returns
    (conditions, per_source: the model and copy-last on each source's windows alone, the model's sample means
    per condition (the probe reads them), every model's sample means per (model, condition))."""
    conditions, per_source, preds = {}, {}, {}
    sample_means: dict[tuple[str, str], list[np.ndarray]] = {}  # (model, condition) -> per window group
    for cond, groups, use in plan:
        by_source, entries = {}, {}
        preds[cond] = []
        for win in groups:
            entry, means = _score_window(sc, wm, baselines, win, use, calibration)
            sc.scored(win)
            preds[cond].append(means[wm.name])
            for name, mean in means.items():
                sample_means.setdefault((name, cond), []).append(mean)
            by_source[win.source] = {"windows": len(win.tokens), wm.name: entry[wm.name],
                                     "copy_last": entry["copy_last"]}
            for name, e in entry.items():
                entries.setdefault(name, []).append((len(win.tokens), e))
        per_source[cond] = by_source
        conditions[cond] = {name: pool(parts) for name, parts in entries.items()}
    return conditions, per_source, preds, sample_means


def _score_window(sc: _Scoring, wm: LoadedWorldModel, baselines: list[LoadedWorldModel], win: Windows, use: bool,
                  calibration: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One window group's scores of the model, copy-last, each baseline (and a point-forecast baseline plus its
    calibrated noise), and each model's sample mean [W, len(horizons), N, Z]."""
    cfg, ctx, idx = sc.cfg, sc.ctx, sc.idx
    samples, states = sc.samples_for(wm, win, use, cfg.k, states=True)
    means = {wm.name: samples.mean(0)}
    copy_last = np.repeat(win.tokens[:, ctx - 1][None, :, None], len(idx), axis=2)
    still = None if states is None else np.repeat(win.frame_states[:, ctx - 1][None, :, None], len(idx), 2)
    entry = {wm.name: sc.score(wm, win, samples, states), "copy_last": sc.score(wm, win, copy_last, still)}
    for bl in baselines:
        bl_samples, bl_states = sc.samples_for(bl, win, use and bl.shape.action_dim > 0, cfg.k, states=True)
        entry[bl.name] = sc.score(bl, win, bl_samples, bl_states)
        means[bl.name] = bl_samples.mean(0)
        if not bl.sampler and cfg.samples > 1:  # a point forecast made a sampler by its own error
            noisy = with_calibrated_noise(bl, bl_samples, calibration[bl.name], cfg.samples, cfg.seed)
            entry[f"{bl.name}+noise"] = sc.score(bl, win, noisy)
    return entry, means


def _k_sweep(sc: _Scoring, wm: LoadedWorldModel, first: tuple[str, list[Windows], bool], ks: tuple[int, ...]
             ) -> KSweep:
    """The model's scores per number of sampling steps K on the first condition, pooled over its windows."""
    cond, groups, use = first
    sweep = {}
    for k in ks:
        parts = []
        for w in groups:
            parts.append((len(w.tokens), sc.score(wm, w, sc.samples_for(wm, w, use, k))))
            sc.scored(w)
        sweep[k] = pool(parts)
    means = {k: float(np.mean(list(v["mse"].values()))) for k, v in sweep.items()}
    energy = {k: float(np.mean(list(v["energy"].values()))) for k, v in sweep.items()}
    best = min(energy, key=energy.get)
    per_k = {key: {str(k): v[key] for k, v in sweep.items()} for key in ("mse", "mse_single", "energy")}
    return KSweep(condition=cond, samples=samples_of(wm, sc.cfg), **per_k, mean_mse=means, mean_energy=energy,
                  best_k=best, k_within_10pct_of_best=energy.get(sc.cfg.k, np.inf) <= 1.1 * energy[best])


def camera_names(reader: TokenReader, wm: LoadedWorldModel, source: str) -> list[str]:
    """Names of a source's cameras in its frames' token order: the model's slot names (camera roles), or for a
    model whose cameras go by position, the source's camera keys."""
    if wm.shape.slots:
        return [wm.shape.slots[i] for i in (wm.layout.slots or range(wm.shape.cameras))]
    keys = [str(k) for k in reader.source_attrs(source).get("cameras", [])]
    return keys if len(keys) == wm.shape.cameras else [f"camera_{i}" for i in range(wm.shape.cameras)]


def _splits(reader: TokenReader) -> dict[str, str]:
    """Per source: how its manifest split the episodes (by episode, or by a group such as a scene)."""
    from pipeline.manifest import split_summary

    out = {}
    for source in reader.sources:
        manifest = Path(reader.source_attrs(source).get("manifest", ""))
        out[source] = split_summary(manifest) if manifest.is_file() else "manifest not found"
    return out
