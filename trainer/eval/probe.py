"""The probes of an eval: the proprio probe (ridge regression from patch latents to the robot's state, fit on train
frames, R^2 on the evaluated windows for the true and the predicted latents) and the scene probe (the feature probe of
`featurestore.probe` on each simulator-recorded source, from the raw tokens and the model's input tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from featurestore.reader import TokenReader
from trainer.api import LoadedWorldModel
from trainer.data import normalize_patches, select_episodes
from trainer.eval.config import EvalConfig
from trainer.eval.metrics import r2
from trainer.eval.windows import Windows


def _probe_features(wm: LoadedWorldModel, raw_WNZ: np.ndarray, proj: np.ndarray | None) -> np.ndarray:
    # patch tokens only: the probe asks what the visual latents know of the state (never the state token)
    raw = raw_WNZ.reshape(len(raw_WNZ), -1, math.prod(wm.shape.grid), raw_WNZ.shape[-1])  # [W, C, P, Z]
    z = normalize_patches(raw, wm.stats, wm.shape, cameras=raw.shape[1]).reshape(len(raw_WNZ), -1)  # C: the source's
    return z @ proj if proj is not None else z


def fit_probe(reader: TokenReader, wm: LoadedWorldModel, cfg: EvalConfig, max_frames: int = 4000
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray] | None:
    """Ridge regression latents -> state on train frames, the ridge strength chosen on held-out train
    episodes. Returns (W, projection, x_mean, y_mean) or None when the store has no states. With sources of
    different state widths (two embodiments), on the episodes of the labelled sources' width (the robot the
    with-actions condition is about; the most common width without labelled sources)."""
    eps = select_episodes(reader, dataclasses.replace(wm.cfg, include_augmented=False), "train")
    kind = {src: (int(reader.source_attrs(src).get("state_dim", 0)), len(reader.source_attrs(src)["cameras"]))
            for src in set(eps.source)}  # (state width, cameras): the probe reads one robot's frames
    labelled = [kind[src] for src in eps[eps.has_actions].source]
    chosen = labelled or [kind[src] for src in eps.source]
    if chosen:
        top = max(set(chosen), key=chosen.count)
        eps = eps[np.array([kind[str(src)] == top for src in eps.source], dtype=bool)]
    rng = np.random.default_rng(cfg.seed)
    xs, ys, groups = [], [], []
    per_ep = max(1, max_frames // max(1, len(eps)))
    for row in eps.index:
        d = reader.episode(int(row), ("patch", "state"))
        if d["state"].shape[1] == 0 or not np.isfinite(d["state"]).all():
            continue
        idx = rng.choice(len(d["patch"]), size=min(per_ep, len(d["patch"])), replace=False)
        xs.append(d["patch"][idx].reshape(len(idx), -1, d["patch"].shape[-1]))
        ys.append(d["state"][idx])
        groups.append(np.full(len(idx), len(groups)))
    if len(xs) < 2:
        return None
    raw = np.concatenate(xs)
    dim = raw.shape[1] * raw.shape[2]
    proj = (rng.standard_normal((dim, 2048)) / np.sqrt(2048)).astype(np.float32) if dim > 4096 else None
    X, Y, grp = _probe_features(wm, raw, proj).astype(np.float64), np.concatenate(ys).astype(np.float64), \
        np.concatenate(groups)
    held = np.isin(grp, rng.permutation(len(xs))[: max(1, len(xs) // 5)])

    def solve(Xa, Ya, lam):
        xm, ym = Xa.mean(0), Ya.mean(0)
        Xc = Xa - xm
        scale = np.trace(Xc.T @ Xc) / Xc.shape[1]
        return np.linalg.solve(Xc.T @ Xc + lam * scale * np.eye(Xc.shape[1]), Xc.T @ (Ya - ym)), xm, ym

    scores = {}
    for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
        W, xm, ym = solve(X[~held], Y[~held], lam)
        scores[lam] = r2(Y[held], (X[held] - xm) @ W + ym)
    W, xm, ym = solve(X, Y, max(scores, key=scores.get))
    return W, proj, xm, ym


def proprio_probe(reader: TokenReader, wm: LoadedWorldModel, cfg: EvalConfig, wins: dict[str, list[Windows]],
                  preds: dict[str, list[np.ndarray]], ctx: int) -> dict[str, Any] | None:
    """Per condition and horizon, R^2 of the probe (`fit_probe`) on the evaluated windows' true latents and on the
    model's predictions of them (`preds`: per condition, each window group's sample mean [W, len(horizons), N, Z]);
    None when the store has no states."""
    fit = fit_probe(reader, wm, cfg)
    if fit is None:
        return None
    W, proj, xm, ym = fit
    width = len(xm) if proj is None else proj.shape[0]
    out: dict[str, Any] = {}
    for cond, pred_groups in preds.items():
        groups = wins["labelled" if cond != "action_free" else "free"]
        # the groups of the probe's robot: its state width and camera count (another embodiment's do not map)
        same = [(win, pred) for win, pred in zip(groups, pred_groups) if win.frame_states.shape[-1] == len(ym)
                and win.tokens.shape[2] * win.tokens.shape[3] == width]
        if not same:
            continue
        row = {"true_latents": {}, "predicted_latents": {}}
        for j, h in enumerate(cfg.horizons):  # pred holds the evaluated horizons only (the sample mean)
            y = np.concatenate([win.frame_states[:, ctx + h - 1] for win, _ in same])
            if not np.isfinite(y).all() or y.shape[1] == 0:
                continue
            true_x = np.concatenate([_probe_features(wm, win.tokens[:, ctx + h - 1], proj) for win, _ in same])
            pred_x = np.concatenate([_probe_features(wm, pred[:, j], proj) for _, pred in same])
            row["true_latents"][h] = r2(y, (true_x - xm) @ W + ym)
            row["predicted_latents"][h] = r2(y, (pred_x - xm) @ W + ym)
        out[cond] = row
    return out


def scene_probe(reader: TokenReader, views: dict, wm: LoadedWorldModel, sources: list[str], cfg: EvalConfig
                ) -> dict[str, Any]:
    """The feature probe (`featurestore.probe`) of each source recorded in a simulator: out-of-fold R^2 from the raw
    patch tokens and from the model's input tokens (`input_tokens`: after its merge and input projection) to the
    scene's state (object and robot positions)."""
    from featurestore.probe import ProbeConfig, flat_tokens, load_probe_data, probe_source, probe_sources

    out: dict[str, Any] = {}
    recorded = probe_sources(reader)
    for src in sources:
        if src not in recorded:
            continue
        data = load_probe_data(reader, src, recorded[src], ProbeConfig(store=reader.path, max_frames=cfg.probe_frames,
                                                                          seed=cfg.seed))
        views_ = {"raw": flat_tokens, "model": views[(wm.name, src)].input_tokens}
        out[src] = probe_source(data, views_, cfg.seed, kernels=("linear",))
    return out
