"""The scores of an eval, pure functions of arrays: a sample set against the truth (`window_scores`: MSE of the
sample mean, mean single-sample MSE, energy score; `errors`: per horizon, on all, on moving tokens and per camera),
the predicted robot state's distance (`state_distance`), the action effect, the probe's R^2, window-weighted pooling
and the calibrated-noise control (`with_calibrated_noise`). Legend: S = samples, W = windows, H = horizons,
P = tokens, Z = token width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trainer.api import LoadedWorldModel
    from trainer.eval.windows import Windows


def state_distance(states_SWHS: np.ndarray, truth_WHS: np.ndarray, horizons: tuple[int, ...]) -> dict[int, float]:
    """Per horizon, the mean over windows of the Euclidean distance from the sample mean of the predicted robot
    states to the true state, in the state's own units (pusht: pixels of the agent's position)."""
    d = np.linalg.norm(states_SWHS.astype(np.float64).mean(0) - truth_WHS, axis=-1)  # [W, H]
    return {h: float(d[:, j].mean()) for j, h in enumerate(horizons)}


def energy_score(samples_SWD: np.ndarray, truth_WD: np.ndarray) -> np.ndarray:
    """Energy score of each window's sample set [S, W, D] against the truth [W, D] (Gneiting & Raftery 2007), in
    its fair ensemble form (Ferro 2014): ES = mean_i |x_i - y| - 1/(2 S (S - 1)) sum_{i != j} |x_i - x_j|
    (Euclidean norms). Its expectation is the score of the distribution the samples come from, so S draws from the
    true distribution beat any other S-member sampler in expectation; the plain form (1/(2 S^2)) would favour
    under-dispersed samplers at small S. Lower is better; for one sample the distance. -> [W]."""
    S = samples_SWD.shape[0]
    first = np.linalg.norm(samples_SWD - truth_WD[None], axis=-1).mean(0)
    if S == 1:
        return first
    spread = np.zeros_like(first)
    for i in range(S):
        for j in range(i + 1, S):
            spread += np.linalg.norm(samples_SWD[i] - samples_SWD[j], axis=-1)
    return first - spread / (S * (S - 1))  # the sum over i < j is half the sum over all pairs


def moving_tokens(truth_WPZ: np.ndarray, last_WPZ: np.ndarray, fraction: float) -> np.ndarray:
    """[W, P] mask of each window's tokens whose true change since the last context frame (squared norm, in the
    scoring normalisation) is in the top `fraction` (at least one token)."""
    change = ((truth_WPZ - last_WPZ) ** 2).sum(-1)
    n = max(1, int(np.ceil(fraction * change.shape[1])))
    top = np.argpartition(-change, n - 1, axis=1)[:, :n]
    mask = np.zeros(change.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def mean_prediction_mse(mse_mean: float, mse_single: float, n: int) -> float:
    """The error of a sampler's own mean prediction (the mean of infinitely many samples), estimated without bias
    from the MSE of the mean of `n` samples and the single-sample MSE: E[mse_mean] = bias + var / n and
    E[mse_single] = bias + var (one sample: the single-sample error itself)."""
    return (n * mse_mean - mse_single) / (n - 1) if n > 1 else mse_single


def window_scores(samples_SWPZ: np.ndarray, truth_WPZ: np.ndarray, mask_WP: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
    """Per window [W]: MSE of the sample mean, mean single-sample MSE, energy score / sqrt(scored values) (so
    a single sample scores its RMSE, comparable across token subsets), on the tokens of `mask` (all if None)."""
    S, W, P, Z = samples_SWPZ.shape
    m = np.ones((W, P), dtype=bool) if mask_WP is None else mask_WP
    count = m.sum(1) * Z  # scored values per window
    mf = m[..., None]
    mse_mean = (((samples_SWPZ.mean(0) - truth_WPZ) ** 2) * mf).sum((1, 2)) / count
    mse_single = ((((samples_SWPZ - truth_WPZ) ** 2) * mf).sum((2, 3)) / count).mean(0)
    es = energy_score((samples_SWPZ * mf).reshape(S, W, -1), (truth_WPZ * mf).reshape(W, -1)) / np.sqrt(count)
    return {"mse": mse_mean, "mse_single": mse_single, "energy": es}


def errors(ref: LoadedWorldModel, samples_raw: np.ndarray, true_raw: np.ndarray, last_raw: np.ndarray,
           horizons: tuple[int, ...], *, moving_fraction: float = 0.1, cameras: list[str] | None = None
           ) -> dict[str, Any]:
    """Scores of a sample set [S, W, len(horizons), P, Z] (raw tokens) against the truth [W, len(horizons), P, Z],
    in `ref`'s normalisation: the window means of `window_scores` on all tokens, on the moving tokens (suffix
    `_moving`, moving relative to the last context frame `last_raw` [W, P, Z]) and per camera; the cosine
    distance of the sample mean to the truth on raw tokens."""
    mean, std = ref.stats.token_mean.astype(np.float64), ref.stats.token_std.astype(np.float64)
    S, W, _, P, Z = samples_raw.shape
    last = (last_raw.astype(np.float64) - mean) / std
    cams = cameras or []
    out: dict[str, Any] = {"samples": S, "mse": {}, "mse_single": {}, "energy": {}, "mse_moving": {},
                           "mse_single_moving": {}, "energy_moving": {}, "cosine": {}}
    if len(cams) > 1:
        out["cameras"] = {c: {"mse": {}, "mse_single": {}, "energy": {}} for c in cams}
    for j, h in enumerate(horizons):
        x = (samples_raw[:, :, j].astype(np.float64) - mean) / std
        t = (true_raw[:, j].astype(np.float64) - mean) / std
        for key, v in window_scores(x, t).items():
            out[key][h] = float(v.mean())
        for key, v in window_scores(x, t, moving_tokens(t, last, moving_fraction)).items():
            out[f"{key}_moving"][h] = float(v.mean())
        if len(cams) > 1:
            per = P // len(cams)
            for c, name in enumerate(cams):
                m = np.zeros((W, P), dtype=bool)
                m[:, c * per:(c + 1) * per] = True
                for key, v in window_scores(x, t, m).items():
                    out["cameras"][name][key][h] = float(v.mean())
        p, tr = samples_raw[:, :, j].astype(np.float64).mean(0), true_raw[:, j].astype(np.float64)
        cos = (p * tr).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(tr, axis=-1) + 1e-12)
        out["cosine"][h] = float((1 - cos).mean())
    return out


def r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    ss_res = ((y_true - y_pred) ** 2).sum()
    ss_tot = ((y_true - y_true.mean(0)) ** 2).sum()
    return float(1 - ss_res / max(ss_tot, 1e-12))


def pool(parts: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Scores of groups of windows (n windows each) pooled over all their windows: every score is a mean over
    windows, so the pool is the window-weighted mean; a key only some groups have (a camera one source lacks)
    pools over those that have it; equal values (sample counts) stay as they are."""
    if len(parts) == 1:
        return parts[0][1]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for _, d in parts for k in d):
        have = [(n, d[key]) for n, d in parts if key in d]
        first = have[0][1]
        if isinstance(first, dict):
            out[key] = pool(have)
        elif all(v == first for _, v in have) or not isinstance(first, (int, float)) or isinstance(first, bool):
            out[key] = first
        else:
            out[key] = sum(n * v for n, v in have) / sum(n for n, _ in have)
    return out


def action_effect(m: LoadedWorldModel, with_actions: list[np.ndarray], null: list[np.ndarray], groups: list[Windows],
                  ctx: int, idx: list[int], horizons: tuple[int, ...]) -> dict[str, Any]:
    """How far the actions move a model's prediction, against how far the true frames move: per horizon, the mean
    squared difference between the sample-mean predictions with the actions and with the null action, and the mean
    squared change of the true frame from the last context frame, both on patch tokens in the model's
    normalisation; `share` is their ratio (1: the actions move the prediction as much as the world moves)."""
    std = m.stats.token_std.astype(np.float64)
    moved, true = {h: [] for h in horizons}, {h: [] for h in horizons}
    for a, n, win in zip(with_actions, null, groups):
        truth, last = win.tokens[:, ctx:][:, idx].astype(np.float64), win.tokens[:, ctx - 1].astype(np.float64)
        for j, h in enumerate(horizons):
            moved[h].append((((a[:, j] - n[:, j]) / std) ** 2).mean(axis=(1, 2)))
            true[h].append((((truth[:, j] - last) / std) ** 2).mean(axis=(1, 2)))
    out = {"moved": {h: float(np.concatenate(moved[h]).mean()) for h in horizons},
           "true_change": {h: float(np.concatenate(true[h]).mean()) for h in horizons}}
    out["share"] = {h: out["moved"][h] / max(out["true_change"][h], 1e-12) for h in horizons}
    return out


def with_calibrated_noise(m: LoadedWorldModel, samples_1WHNZ: np.ndarray, rms_HZ: np.ndarray, n: int, seed: int
                          ) -> np.ndarray:
    """A point forecast [1, W, H, N, Z] turned into n samples: itself plus Gaussian noise of its own train-split RMS
    error per horizon and channel (`calibrate_noise`). The control any sampler's energy score must beat: an energy
    score rewards calibrated spread whether or not the model knows the future better."""
    rng = np.random.default_rng(seed + 104729)
    noise = rng.standard_normal((n, *samples_1WHNZ.shape[1:])) * rms_HZ[None, None, :, None, :]
    return samples_1WHNZ + noise
