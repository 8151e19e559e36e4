"""`wmctl eval`: how far ahead can the model be trusted, with and without actions, against baselines?

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
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from featurestore.encoders import check_same_encoder
from featurestore.reader import TokenReader, Window
from pipeline.names import safe_component
from pipeline.stage import UserError, atomic_write_json
from trainer.api import LoadedWorldModel
from trainer.checkpoint import resolve_checkpoint
from trainer.data import normalize_patches, select_episodes
from trainer.runs import check_writable, eval_dir, run_dir_of
from trainer.tracking import open_tracker

log = logging.getLogger(__name__)

CONDITIONS = ("actions", "null_action", "action_free")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    ckpt: Path  # a run folder or a checkpoint folder
    store: Path | None = None  # default: the store the run was trained on
    horizons: tuple[int, ...] = (1, 5, 10, 20)
    split: str = "val"
    episodes: int | None = None  # at most this many episodes per condition
    windows_per_episode: int = 4
    context: int | None = None  # context frames (default: half the model's window)
    k: int = 4
    samples: int = 4  # samples per window for a sampler (deterministic models: 1)
    moving_fraction: float = 0.1  # "moving" tokens: this top fraction by true change over the horizon
    k_sweep: tuple[int, ...] | None = None  # default: powers of two up to min(16, k_max)
    weights: str = "ema"
    baselines: tuple[Path, ...] = ()
    probe: bool = True
    probe_frames: int = 2000  # frames the scene probe samples (its kernel is this squared)
    action_effect: bool = True  # how far the actions move each model's prediction against the true change
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    out: Path | None = None  # default: <run>/eval; given, everything eval writes goes there (its tracker's too)
    plots: bool = True
    decoder: Path | None = None  # a visualisation decoder: also write `rollouts` side-by-side PNG grids
    rollouts: int = 3
    tracker: str = "tensorboard"  # also show the figures where the run's training curves are (trainer.tracking)

    def __post_init__(self) -> None:
        if not self.horizons or min(self.horizons) < 1:
            raise UserError("--horizons must be positive integers, e.g. 1,5,10,20")
        if self.weights not in ("ema", "model"):
            raise UserError("weights must be ema or model")
        if self.samples < 1:
            raise UserError("--samples must be >= 1")
        if not 0 < self.moving_fraction <= 1:
            raise UserError("--moving-fraction must be in (0, 1]")


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


def _same_encoder(reader: TokenReader, wm: LoadedWorldModel) -> None:
    check_same_encoder(wm.encoder, reader.encoder, what=wm.name,
                       fix=f"evaluate on a store made with the encoder {wm.name} was trained on")


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


def r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    ss_res = ((y_true - y_pred) ** 2).sum()
    ss_tot = ((y_true - y_true.mean(0)) ** 2).sum()
    return float(1 - ss_res / max(ss_tot, 1e-12))


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


def with_calibrated_noise(m: LoadedWorldModel, samples_1WHNZ: np.ndarray, rms_HZ: np.ndarray, n: int, seed: int
                          ) -> np.ndarray:
    """A point forecast [1, W, H, N, Z] turned into n samples: itself plus Gaussian noise of its own train-split RMS
    error per horizon and channel (`calibrate_noise`). The control any sampler's energy score must beat: an energy
    score rewards calibrated spread whether or not the model knows the future better."""
    rng = np.random.default_rng(seed + 104729)
    noise = rng.standard_normal((n, *samples_1WHNZ.shape[1:])) * rms_HZ[None, None, :, None, :]
    return samples_1WHNZ + noise


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


def output_folders(cfg: EvalConfig) -> tuple[Path, Path]:
    """Where eval writes (eval.json, plots, rollout grids) and where its tracker writes (the run's tracker next to
    its training curves; with --out, the --out folder: nothing is then written into the run). Both checked writable
    before anything is computed."""
    ckpt = resolve_checkpoint(cfg.ckpt)
    out = cfg.out or eval_dir(ckpt)
    track = out if cfg.out is not None else run_dir_of(ckpt)
    fix = "pass --out DIR (a folder you can write; nothing is then written into the run)"
    check_writable(out, "the eval output folder", fix)
    if cfg.tracker != "none":
        check_writable(track, f"the folder of the eval's --tracker {cfg.tracker}", f"{fix}, or --tracker none")
    return out, track


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    out, track = output_folders(cfg)
    wm = LoadedWorldModel.load(cfg.ckpt, weights=cfg.weights, device=cfg.device)
    store = cfg.store or wm.store
    reader = TokenReader(store)
    _same_encoder(reader, wm)
    baselines = [LoadedWorldModel.load(b, weights=cfg.weights, device=cfg.device) for b in cfg.baselines]
    for b in baselines:
        _same_encoder(reader, b)
        skips = lambda m: (m.cfg.frameskip, dict(m.cfg.source_frameskip))  # noqa: E731
        if skips(b) != skips(wm):
            raise UserError(f"baseline {b.name} uses frameskip {b.cfg.frameskip} "
                            f"{dict(b.cfg.source_frameskip) or ''}, the model {wm.cfg.frameskip} "
                            f"{dict(wm.cfg.source_frameskip) or ''}: compare models trained at one rate")
    ctx = cfg.context or max(1, wm.window // 2)
    H = max(cfg.horizons)
    k_sweep = cfg.k_sweep or tuple(2**i for i in range(0, 5) if 2**i <= wm.cfg.model.k_max)
    if wm.sampler and (cfg.k > wm.cfg.model.k_max or cfg.k & (cfg.k - 1)):
        raise UserError(f"--k {cfg.k} must be a power of two <= k_max {wm.cfg.model.k_max}")
    wins = collect_windows(reader, wm, cfg, ctx)
    srcs = sorted({w.source for groups in wins.values() for w in groups})
    views = {(m.name, src): m.for_source(reader, src) for m in (wm, *baselines) for src in srcs}
    cams = {src: camera_names(reader, views[(wm.name, src)], src) for src in srcs}
    result: dict[str, Any] = {
        "model": wm.name, "kind": wm.kind, "store": str(store), "context": ctx, "horizons": list(cfg.horizons),
        "k": cfg.k, "split": cfg.split, "weights": cfg.weights, "seed": cfg.seed,
        "samples": {m.name: samples_of(m, cfg) for m in (wm, *baselines)}, "moving_fraction": cfg.moving_fraction,
        "cameras": list(dict.fromkeys(c for src in srcs for c in cams[src])),
        "source_cameras": cams,  # each source's cameras, by the model's slot names (per-camera scores use them)
        # training saw windows of this many frames; every prediction attends to at most that many (rollouts
        # longer than the window slide it, see trainer.sampling), so no horizon runs in an untrained regime
        "trained_window": wm.cfg.max_context(),
        # each model sees the last frames of the context that fit its window (DINO-WM: 3), never more
        "context_used": {m.name: min(ctx, m.max_context_frames) for m in (wm, *baselines)},
        "slides_after_horizon": {m.name: max(0, m.window - ctx) for m in (wm, *baselines)},
        "windows": {name: sum(len(w.tokens) for w in groups) for name, groups in wins.items()}, "conditions": {},
        "per_source": {}, "splits": _splits(reader),
    }
    plan = []
    if "labelled" in wins and wm.shape.action_dim:
        plan += [("actions", wins["labelled"], True), ("null_action", wins["labelled"], False)]
    elif "labelled" in wins:
        plan += [("null_action", wins["labelled"], False)]
    if "free" in wins:
        plan += [("action_free", wins["free"], False)]
    preds: dict[str, list[np.ndarray]] = {}
    sample_means: dict[tuple[str, str], list[np.ndarray]] = {}  # (model, condition) -> per window group
    idx = [h - 1 for h in cfg.horizons]

    def score(m: LoadedWorldModel, win: Windows, samples: np.ndarray, states: np.ndarray | None = None
              ) -> dict[str, Any]:
        truth, last = win.tokens[:, ctx:][:, idx], win.tokens[:, ctx - 1]
        out = errors(m, samples, truth, last, cfg.horizons, moving_fraction=cfg.moving_fraction,
                     cameras=cams[win.source])
        if states is not None:  # where the model says the robot goes (models with proprioception)
            out["state_dist"] = state_distance(states, win.frame_states[:, ctx:][:, idx], cfg.horizons)
        return out

    def samples_for(m: LoadedWorldModel, win: Windows, use: bool, k: int, states: bool = False):
        return sample_set(views[(m.name, win.source)], win, ctx, cfg, use_actions=use, k=k, states=states)

    calibration = {bl.name: calibrate_noise(reader, bl, views, cfg, ctx) for bl in baselines
                   if not bl.sampler and cfg.samples > 1 and "labelled" in wins}
    for cond, groups, use in plan:  # each source's windows on its own cameras, then pooled over windows
        per_source, entries = {}, {}
        preds[cond] = []
        for win in groups:
            samples, states = samples_for(wm, win, use, cfg.k, states=True)
            preds[cond].append(samples.mean(0))  # the probe reads the sample mean
            sample_means.setdefault((wm.name, cond), []).append(samples.mean(0))
            copy_last = np.repeat(win.tokens[:, ctx - 1][None, :, None], len(idx), axis=2)
            still = None if states is None else np.repeat(win.frame_states[:, ctx - 1][None, :, None], len(idx), 2)
            entry = {wm.name: score(wm, win, samples, states), "copy_last": score(wm, win, copy_last, still)}
            for bl in baselines:
                bl_samples, bl_states = samples_for(bl, win, use and bl.shape.action_dim > 0, cfg.k, states=True)
                entry[bl.name] = score(bl, win, bl_samples, bl_states)
                sample_means.setdefault((bl.name, cond), []).append(bl_samples.mean(0))
                if not bl.sampler and cfg.samples > 1:  # a point forecast made a sampler by its own error
                    noisy = with_calibrated_noise(bl, bl_samples, calibration[bl.name], cfg.samples, cfg.seed)
                    entry[f"{bl.name}+noise"] = score(bl, win, noisy)
            per_source[win.source] = {"windows": len(win.tokens), wm.name: entry[wm.name],
                                      "copy_last": entry["copy_last"]}
            for name, e in entry.items():
                entries.setdefault(name, []).append((len(win.tokens), e))
        result["per_source"][cond] = per_source  # the model and copy-last on each source's windows alone
        result["conditions"][cond] = {name: pool(parts) for name, parts in entries.items()}
    if wm.sampler and plan:
        cond, groups, use = plan[0]
        sweep = {k: pool([(len(w.tokens), score(wm, w, samples_for(wm, w, use, k))) for w in groups])
                 for k in k_sweep}
        means = {k: float(np.mean(list(v["mse"].values()))) for k, v in sweep.items()}
        energy = {k: float(np.mean(list(v["energy"].values()))) for k, v in sweep.items()}
        best = min(energy, key=energy.get)
        result["k_sweep"] = {"condition": cond, "samples": samples_of(wm, cfg),
                             **{key: {str(k): v[key] for k, v in sweep.items()} for key in ("mse", "mse_single",
                                                                                           "energy")},
                             "mean_mse": means, "mean_energy": energy, "best_k": best,
                             "k_within_10pct_of_best": energy.get(cfg.k, np.inf) <= 1.1 * energy[best]}
    if ("labelled" in wins and wm.shape.action_dim) and cfg.action_effect:
        result["action_effect"] = {m.name: action_effect(m, sample_means[(m.name, "actions")],
                                                         sample_means[(m.name, "null_action")], wins["labelled"], ctx,
                                                         idx, cfg.horizons)
                                   for m in (wm, *baselines) if (m.name, "null_action") in sample_means}
    if cfg.probe:
        result["probe"] = _probe(reader, wm, cfg, wins, preds, ctx)
        result["scene_probe"] = scene_probe(reader, views, wm, srcs, cfg)
    result["seconds"] = time.monotonic() - t0
    _write(cfg, wm, reader, result, out, track, min(H, 20))
    return result


def _write(cfg: EvalConfig, wm: LoadedWorldModel, reader: TokenReader, result: dict[str, Any], out: Path,
           track: Path, horizon: int) -> None:
    """eval.json (first as soon as the scores exist, again with the figures' paths), plots, rollout grids into
    `out`; the figures into the tracker at `track`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", result)
    if cfg.plots:
        from trainer.eval_plots import plot_eval

        result["plots"] = plot_eval(result, out)
    if cfg.decoder is not None:
        result["rollouts"] = _rollout_grids(cfg, reader, out, horizon)
    atomic_write_json(out / "eval.json", result)
    _track(cfg, wm, result, track)
    result["out"] = str(out)


def _track(cfg: EvalConfig, wm: LoadedWorldModel, result: dict[str, Any], folder: Path) -> None:
    """The eval figures in the tracker at `folder` (the run's, next to its training curves, unless --out), at the
    training step of the checkpoint evaluated: per condition, metric, model and horizon one scalar
    (`eval/actions/mse/model/h5`), so evals of successive checkpoints form curves over training (and W&B, whose
    steps only go forward, keeps them: `trainer.tracking`); the plots and rollout grids as images at that step.
    W&B: the run's own project, entity and tags."""
    run = wm.cfg
    tracker = open_tracker(cfg.tracker, folder, name=run_dir_of(wm.checkpoint).name, project=run.wandb_project,
                           entity=run.wandb_entity, tags=run.wandb_tags)
    try:
        values = {}
        for cond, entry in result["conditions"].items():
            for name, errs in entry.items():
                label = "model" if name == wm.name else name.split("/")[0] + ("+noise" if name.endswith("+noise")
                                                                               else "")
                for metric in ("mse", "mse_single", "energy", "mse_moving"):
                    values.update({f"eval/{cond}/{metric}/{label}/h{int(h)}": v for h, v in errs[metric].items()})
        tracker.scalars(values, wm.step)
        for png in [*result.get("plots", []), *result.get("rollouts", [])]:
            tracker.image(f"eval/{Path(png).stem}", Path(png), wm.step)
    finally:
        tracker.close()


def camera_names(reader: TokenReader, wm: LoadedWorldModel, source: str) -> list[str]:
    """Names of a source's cameras in its frames' token order: the model's slot names (camera roles), or for a
    model whose cameras go by position, the source's camera keys."""
    if wm.shape.slots:
        return [wm.shape.slots[i] for i in (wm.layout.slots or range(wm.shape.cameras))]
    keys = [str(k) for k in reader.source_attrs(source).get("cameras", [])]
    return keys if len(keys) == wm.shape.cameras else [f"camera_{i}" for i in range(wm.shape.cameras)]


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


def _splits(reader: TokenReader) -> dict[str, str]:
    """Per source: how its manifest split the episodes (by episode, or by a group such as a scene)."""
    from pipeline.manifest import split_summary

    out = {}
    for source in reader.sources:
        manifest = Path(reader.source_attrs(source).get("manifest", ""))
        out[source] = split_summary(manifest) if manifest.is_file() else "manifest not found"
    return out


def _rollout_grids(cfg: EvalConfig, reader: TokenReader, out: Path, horizon: int) -> list[str]:
    """PNG grids (truth | decoded truth | with actions | null action) of the first `cfg.rollouts` episodes of
    the evaluated split in the decoder's source, labelled episodes first."""
    from featurestore.decoder import load_decoder
    from trainer.visualize import VisualizeConfig, run_visualize

    _, meta = load_decoder(cfg.decoder)
    eps = reader.episodes
    eps = eps[(eps.source == meta["source"]) & (eps.split == cfg.split) & (eps.view == 0)]
    eps = eps.sort_values(["has_actions", "episode_index"], ascending=[False, True])
    paths = []
    for e in eps.episode_index.iloc[: cfg.rollouts]:
        source = safe_component(meta["source"], f"decoder {cfg.decoder}: its source", "fix its decoder.json")
        path = out / f"rollout_{source}_ep{int(e)}.png"
        run_visualize(VisualizeConfig(run=cfg.ckpt, out=path, store=reader.path, decoder=cfg.decoder, episode=int(e),
                                      horizon=horizon, context=cfg.context, k=cfg.k, seed=cfg.seed))
        paths.append(str(path))
    return paths


def _probe(reader, wm, cfg, wins, preds, ctx) -> dict[str, Any] | None:
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
