"""Evaluation windows and the predictions scored on them: `collect_windows` (per condition, each source's windows of
raw tokens, actions and states), `predict` / `sample_set` (a model's raw-token rollouts from their context, N samples
for a sampler) and `calibrate_noise` (a point forecast's own train-split error, for the calibrated-noise control).
Legend: W = windows, T = frames, H = horizons, N = tokens per frame, Z = token width, S = samples or state width.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import torch

from featurestore.reader import TokenReader, Window
from pipeline.stage import UserError
from trainer.api import LoadedWorldModel
from trainer.data import select_episodes
from trainer.eval.config import EvalConfig


@dataclasses.dataclass
class Windows:
    """Evaluation windows of one condition: raw tokens, per-step raw actions and states."""

    tokens: np.ndarray  # [W, T, N, Z] raw
    actions: np.ndarray  # [W, (T-1)*fs, A] raw per-step actions (NaN where none)
    states: np.ndarray  # [W, (T-1)*fs, S] states at those steps (for relative actions)
    frame_states: np.ndarray  # [W, T, S] states at the frames (probe targets)
    use_actions: bool
    sources: np.ndarray  # [W] the store source of each window (per-source scores)
    source: str = ""  # the one source of every window (each source's windows are a group: its own cameras)


def collect_windows(reader: TokenReader, wm: LoadedWorldModel, cfg: EvalConfig, ctx: int
                    ) -> dict[str, list[Windows]]:
    """Per condition ("labelled", "free"), the windows of each source (a source's frames hold its own cameras,
    and a model frame spans its own frameskip)."""
    H = max(cfg.horizons)
    T = ctx + H
    eps = select_episodes(reader, dataclasses.replace(wm.cfg, include_augmented=False), cfg.split)
    if eps.empty:
        raise UserError(f"{reader.path} has no committed {cfg.split!r} episodes; re-ingest with --val-fraction > 0 "
                        "(or evaluate --split train)")
    skips = pd.Series(wm.cfg.frameskips(eps.source), index=eps.index)
    ok = eps[eps.length >= (T - 1) * skips + 1]
    fs = wm.cfg.frameskip
    span = (T - 1) * fs + 1
    if ok.empty:
        raise UserError(f"horizon {H} with {ctx} context frames (frameskip {fs}) needs {span} frames, but the "
                        f"longest {cfg.split} episode has {int(eps.length.max())}; lower --horizons or --context")
    for labelled, name in ((True, "labelled (the with-actions and null-action rows)"), (False, "action-free")):
        have = eps[eps.has_actions == labelled]
        if len(have) and not (ok.has_actions == labelled).any():  # never drop a condition without a word
            fs = int(skips[have.index].iloc[0])
            span = (T - 1) * fs + 1
            fits = (int(have.length.max()) - 1) // fs + 1 - ctx
            raise UserError(f"horizon {H} with {ctx} context frames (frameskip {fs}) needs {span} frames, but the "
                            f"longest {name} {cfg.split} episode has {int(have.length.max())}: lower --horizons to "
                            f"<= {fits} (or --context) so every condition is evaluated on the same horizons")
    out = {}
    for labelled in (True, False):
        rows = ok[ok.has_actions == labelled]
        if cfg.episodes:
            rows = rows.iloc[: cfg.episodes]
        if rows.empty:
            continue
        groups = []
        for src in sorted(set(rows.source)):
            groups.append(_source_windows(reader, rows[rows.source == src], cfg, T, wm.cfg.frameskip_of(src),
                                          labelled))
        out["labelled" if labelled else "free"] = groups
    return out


def _source_windows(reader: TokenReader, rows, cfg: EvalConfig, T: int, fs: int, labelled: bool) -> Windows:
    """`cfg.windows_per_episode` windows of T frames (frameskip fs) from each episode of `rows` (one source)."""
    span = (T - 1) * fs + 1
    toks, acts, sts, fsts = [], [], [], []
    for row, e in rows.iterrows():
        for s in np.unique(np.linspace(0, int(e.length) - span, cfg.windows_per_episode).astype(int)):
            w = reader.read(Window(int(row), int(s), T, fs), ("patch", "state"))
            lo = reader.read(Window(int(row), int(s), span), ("action", "state"))
            toks.append(w["patch"].reshape(T, -1, w["patch"].shape[-1]))
            acts.append(lo["action"][: span - 1])
            sts.append(lo["state"][: span - 1])
            fsts.append(w["state"])
    src = str(rows.source.iloc[0])
    return Windows(np.stack(toks), np.stack(acts), np.stack(sts), np.stack(fsts), labelled,
                   np.full(len(toks), src), src)


def predict(wm: LoadedWorldModel, win: Windows, ctx: int, horizon: int, *, use_actions: bool, k: int, seed: int,
            batch_size: int, sample: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw-token predictions [W, H, N, Z] of `wm` for the frames after `ctx` context frames (sample `sample`:
    its own noise, for a sampler), and the raw robot states it predicts [W, H, S] (None for a model without
    proprioception)."""
    outs, sts = [], []
    for i in range(0, len(win.tokens), batch_size):
        sl = slice(i, i + batch_size)
        ctx_tokens = win.tokens[sl, :ctx]  # [B, ctx, N, Z] -> with its camera axis [B, ctx, C, P, Z]
        ctx_tokens = ctx_tokens.reshape(*ctx_tokens.shape[:2], -1, math.prod(wm.shape.grid), ctx_tokens.shape[-1])
        z = wm.normalize(ctx_tokens, win.frame_states[sl, :ctx])
        B = z.shape[0]
        if use_actions:
            steps = wm.action_inputs(np.nan_to_num(win.actions[sl]), win.states[sl])
            acts = wm.frame_actions(steps)[:, : ctx + horizon]
            valid = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
            valid[:, 0] = False
        else:
            acts = torch.zeros(B, ctx + horizon, wm.shape.action_dim, device=z.device)
            valid = torch.zeros(B, ctx + horizon, dtype=torch.bool, device=z.device)
        g = torch.Generator().manual_seed(seed * 7919 + i + sample * 1_000_003)
        pred = wm.rollout(z, acts, horizon=horizon, valid_BT=valid, k=k, generator=g)
        outs.append(wm.denormalize(pred).cpu().numpy())
        if wm.shape.state_dim:
            sts.append(wm.state_of(pred).cpu().numpy())
    return np.concatenate(outs), (np.concatenate(sts) if sts else None)


def samples_of(wm: LoadedWorldModel, cfg: EvalConfig) -> int:
    """How many samples per window score `wm`: `cfg.samples` for a sampler, 1 for a deterministic model."""
    return cfg.samples if wm.sampler else 1


def sample_set(wm: LoadedWorldModel, win: Windows, ctx: int, cfg: EvalConfig, *, use_actions: bool, k: int,
               states: bool = False):
    """[S, W, len(horizons), N, Z] raw predictions at the evaluated horizons, S = samples_of(wm). `states`: also
    the predicted raw robot states [S, W, len(horizons), S_robot] (None without proprioception), as a pair."""
    H, idx = max(cfg.horizons), [h - 1 for h in cfg.horizons]
    draws = [predict(wm, win, ctx, H, use_actions=use_actions, k=k, seed=cfg.seed, batch_size=cfg.batch_size,
                     sample=s) for s in range(samples_of(wm, cfg))]
    patches = np.stack([p[:, idx] for p, _ in draws])
    if not states:
        return patches
    return patches, (None if draws[0][1] is None else np.stack([st[:, idx] for _, st in draws]))


def calibrate_noise(reader: TokenReader, m: LoadedWorldModel, views: dict, cfg: EvalConfig, ctx: int) -> np.ndarray:
    """Per horizon and token channel, the RMS error [len(horizons), Z] of a point forecast (with the actions) on
    labelled windows of the *train* split, so the calibration never sees the evaluated windows."""
    train = collect_windows(reader, m, dataclasses.replace(cfg, split="train"), ctx).get("labelled", [])
    idx = [h - 1 for h in cfg.horizons]
    sq = []
    for win in train:
        view = views.get((m.name, win.source), m)
        pred = sample_set(view, win, ctx, dataclasses.replace(cfg, samples=1), use_actions=True, k=cfg.k)[0]
        truth = win.tokens[:, ctx:][:, idx].astype(np.float64)
        sq.append(((pred - truth) ** 2).mean(axis=2))  # [W, len(horizons), Z]
    if not sq:
        raise UserError("the calibrated-noise row needs labelled train windows; none were found")
    return np.sqrt(np.concatenate(sq).mean(axis=0))
