"""`wmctl eval`: how far ahead can the model be trusted, with and without actions, against baselines?

On held-out episodes: from each context, roll out h frames and compare with the encoded truth at
horizons 1, 5, 10, 20 (MSE on normalised patch tokens, cosine distance on raw tokens) for (a) labelled
clips with their actions, (b) the same clips with the null action, (c) action-free clips; copy-last and
any other checkpoint (e.g. the teacher-forced baseline) on the same windows; error against the number of
sampling steps K; and a linear probe from latents to proprio state (fit on train, R^2 on val, for true and
predicted latents). Every model reads the raw tokens through its own statistics; errors are measured in
the evaluated model's normalisation. Deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.encoders import check_same_encoder
from featurestore.reader import TokenReader, Window
from pipeline.stage import UserError, atomic_write_json
from trainer.api import LoadedWorldModel
from trainer.data import normalize_patches, select_episodes
from trainer.runs import eval_dir

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
    k_sweep: tuple[int, ...] | None = None  # default: powers of two up to min(16, k_max)
    weights: str = "ema"
    baselines: tuple[Path, ...] = ()
    probe: bool = True
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    out: Path | None = None  # default: <run>/eval
    plots: bool = True
    decoder: Path | None = None  # a visualisation decoder: also write `rollouts` side-by-side PNG grids
    rollouts: int = 3

    def __post_init__(self) -> None:
        if not self.horizons or min(self.horizons) < 1:
            raise UserError("--horizons must be positive integers, e.g. 1,5,10,20")
        if self.weights not in ("ema", "model"):
            raise UserError("weights must be ema or model")


@dataclasses.dataclass
class Windows:
    """Evaluation windows of one condition: raw tokens, per-step raw actions and states."""

    tokens: np.ndarray  # [W, T, N, Z] raw
    actions: np.ndarray  # [W, (T-1)*fs, A] raw per-step actions (NaN where none)
    states: np.ndarray  # [W, (T-1)*fs, S] states at those steps (for relative actions)
    frame_states: np.ndarray  # [W, T, S] states at the frames (probe targets)
    use_actions: bool


def _same_encoder(reader: TokenReader, wm: LoadedWorldModel) -> None:
    check_same_encoder(wm.encoder, reader.encoder, what=wm.name,
                       fix=f"evaluate on a store made with the encoder {wm.name} was trained on")


def collect_windows(reader: TokenReader, wm: LoadedWorldModel, cfg: EvalConfig, ctx: int) -> dict[str, Windows]:
    fs, H = wm.cfg.frameskip, max(cfg.horizons)
    T = ctx + H
    span = (T - 1) * fs + 1
    eps = select_episodes(reader, dataclasses.replace(wm.cfg, include_augmented=False), cfg.split)
    if eps.empty:
        raise UserError(f"{reader.path} has no committed {cfg.split!r} episodes; re-ingest with --val-fraction > 0 "
                        "(or evaluate --split train)")
    ok = eps[eps.length >= span]
    if ok.empty:
        raise UserError(f"horizon {H} with {ctx} context frames (frameskip {fs}) needs {span} frames, but the "
                        f"longest {cfg.split} episode has {int(eps.length.max())}; lower --horizons or --context")
    for labelled, name in ((True, "labelled (the with-actions and null-action rows)"), (False, "action-free")):
        have = eps[eps.has_actions == labelled]
        if len(have) and not (ok.has_actions == labelled).any():  # never drop a condition without a word
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
        toks, acts, sts, fsts = [], [], [], []
        for row, e in rows.iterrows():
            starts = np.unique(np.linspace(0, int(e.length) - span, cfg.windows_per_episode).astype(int))
            for s in starts:
                w = reader.read(Window(int(row), int(s), T, fs), ("patch", "state"))
                lo = reader.read(Window(int(row), int(s), span), ("action", "state"))
                toks.append(w["patch"].reshape(T, -1, w["patch"].shape[-1]))
                acts.append(lo["action"][: span - 1])
                sts.append(lo["state"][: span - 1])
                fsts.append(w["state"])
        out["labelled" if labelled else "free"] = Windows(np.stack(toks), np.stack(acts), np.stack(sts),
                                                         np.stack(fsts), labelled)
    return out


def predict(wm: LoadedWorldModel, win: Windows, ctx: int, horizon: int, *, use_actions: bool, k: int, seed: int,
            batch_size: int) -> np.ndarray:
    """Raw-token predictions [W, H, N, Z] of `wm` for the frames after `ctx` context frames."""
    outs = []
    for i in range(0, len(win.tokens), batch_size):
        sl = slice(i, i + batch_size)
        z = wm.normalize(win.tokens[sl, :ctx], win.frame_states[sl, :ctx])
        B = z.shape[0]
        if use_actions:
            steps = wm.action_inputs(np.nan_to_num(win.actions[sl]), win.states[sl])
            acts = wm.frame_actions(steps)[:, : ctx + horizon]
            valid = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
            valid[:, 0] = False
        else:
            acts = torch.zeros(B, ctx + horizon, wm.shape.action_dim, device=z.device)
            valid = torch.zeros(B, ctx + horizon, dtype=torch.bool, device=z.device)
        g = torch.Generator().manual_seed(seed * 7919 + i)
        pred = wm.rollout(z, acts, horizon=horizon, valid_BT=valid, k=k, generator=g)
        outs.append(wm.denormalize(pred).cpu().numpy())
    return np.concatenate(outs)


def errors(ref: LoadedWorldModel, pred_raw: np.ndarray, true_raw: np.ndarray, horizons: tuple[int, ...]
           ) -> dict[str, dict[int, float]]:
    """MSE in `ref`'s normalisation and mean cosine distance of raw tokens, at each horizon."""
    std = ref.stats.token_std
    out: dict[str, dict[int, float]] = {"mse": {}, "cosine": {}}
    for h in horizons:
        p, t = pred_raw[:, h - 1].astype(np.float64), true_raw[:, h - 1].astype(np.float64)
        out["mse"][h] = float((((p - t) / std) ** 2).mean())
        cos = (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1) + 1e-12)
        out["cosine"][h] = float((1 - cos).mean())
    return out


def _probe_features(wm: LoadedWorldModel, raw_WNZ: np.ndarray, proj: np.ndarray | None) -> np.ndarray:
    # patch tokens only: the probe asks what the visual latents know of the state (never the state token)
    z = normalize_patches(raw_WNZ, wm.stats, wm.shape).reshape(len(raw_WNZ), -1)
    return z @ proj if proj is not None else z


def fit_probe(reader: TokenReader, wm: LoadedWorldModel, cfg: EvalConfig, max_frames: int = 4000
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray] | None:
    """Ridge regression latents -> state on train frames, the ridge strength chosen on held-out train
    episodes. Returns (W, projection, x_mean, y_mean) or None when the store has no states."""
    eps = select_episodes(reader, dataclasses.replace(wm.cfg, include_augmented=False), "train")
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


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    wm = LoadedWorldModel.load(cfg.ckpt, weights=cfg.weights, device=cfg.device)
    store = cfg.store or wm.store
    reader = TokenReader(store)
    _same_encoder(reader, wm)
    baselines = [LoadedWorldModel.load(b, weights=cfg.weights, device=cfg.device) for b in cfg.baselines]
    for b in baselines:
        _same_encoder(reader, b)
        if b.cfg.frameskip != wm.cfg.frameskip:
            raise UserError(f"baseline {b.name} uses frameskip {b.cfg.frameskip}, the model {wm.cfg.frameskip}")
    ctx = cfg.context or max(1, wm.window // 2)
    H = max(cfg.horizons)
    k_sweep = cfg.k_sweep or tuple(2**i for i in range(0, 5) if 2**i <= wm.cfg.model.k_max)
    if cfg.k > wm.cfg.model.k_max or cfg.k & (cfg.k - 1):
        raise UserError(f"--k {cfg.k} must be a power of two <= k_max {wm.cfg.model.k_max}")
    wins = collect_windows(reader, wm, cfg, ctx)
    result: dict[str, Any] = {
        "model": wm.name, "kind": wm.kind, "store": str(store), "context": ctx, "horizons": list(cfg.horizons),
        "k": cfg.k, "split": cfg.split, "weights": cfg.weights, "seed": cfg.seed,
        # training saw windows of this many frames; a prediction whose context plus horizon is longer runs in a
        # regime nothing trained (the rollout slides its window): marked, not hidden
        "trained_window": wm.cfg.max_context(),
        "beyond_trained_window": [h for h in cfg.horizons if ctx + h > wm.cfg.max_context()],
        "windows": {name: len(w.tokens) for name, w in wins.items()}, "conditions": {},
        "splits": _splits(reader),
    }
    plan = []
    if "labelled" in wins and wm.shape.action_dim:
        plan += [("actions", wins["labelled"], True), ("null_action", wins["labelled"], False)]
    elif "labelled" in wins:
        plan += [("null_action", wins["labelled"], False)]
    if "free" in wins:
        plan += [("action_free", wins["free"], False)]
    preds: dict[str, np.ndarray] = {}
    for cond, win, use in plan:
        truth = win.tokens[:, ctx:]
        entry = {}
        pred = predict(wm, win, ctx, H, use_actions=use, k=cfg.k, seed=cfg.seed, batch_size=cfg.batch_size)
        preds[cond] = pred
        entry[wm.name] = errors(wm, pred, truth, cfg.horizons)
        copy = np.repeat(win.tokens[:, ctx - 1:ctx], H, axis=1)
        entry["copy_last"] = errors(wm, copy, truth, cfg.horizons)
        for b in baselines:
            bp = predict(b, win, ctx, H, use_actions=use and b.shape.action_dim > 0, k=cfg.k, seed=cfg.seed,
                         batch_size=cfg.batch_size)
            entry[b.name] = errors(wm, bp, truth, cfg.horizons)
        result["conditions"][cond] = entry
    if wm.kind == "shortcut" and plan:
        cond, win, use = plan[0]
        sweep = {}
        for k in k_sweep:
            p = predict(wm, win, ctx, H, use_actions=use, k=k, seed=cfg.seed, batch_size=cfg.batch_size)
            sweep[k] = errors(wm, p, win.tokens[:, ctx:], cfg.horizons)["mse"]
        means = {k: float(np.mean(list(v.values()))) for k, v in sweep.items()}
        best = min(means, key=means.get)
        result["k_sweep"] = {"condition": cond, "mse": {str(k): v for k, v in sweep.items()}, "mean_mse": means,
                             "best_k": best, "k_within_10pct_of_best": means.get(cfg.k, np.inf) <= 1.1 * means[best]}
    if cfg.probe:
        result["probe"] = _probe(reader, wm, cfg, wins, preds, ctx)
    result["seconds"] = time.monotonic() - t0
    out = cfg.out or eval_dir(wm.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", result)
    if cfg.plots:
        from trainer.eval_plots import plot_eval

        result["plots"] = plot_eval(result, out)
    if cfg.decoder is not None:
        result["rollouts"] = _rollout_grids(cfg, reader, out, min(H, 20))
    atomic_write_json(out / "eval.json", result)
    result["out"] = str(out)
    return result


def _splits(reader: TokenReader) -> dict[str, str]:
    """Per source: how its manifest split the episodes (by episode, or by a group such as a scene)."""
    from pipeline.ingest import split_summary

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
        path = out / f"rollout_{meta['source']}_ep{int(e)}.png"
        run_visualize(VisualizeConfig(run=cfg.ckpt, out=path, store=reader.path, decoder=cfg.decoder, episode=int(e),
                                      horizon=horizon, context=cfg.context, k=cfg.k, seed=cfg.seed))
        paths.append(str(path))
    return paths


def _probe(reader, wm, cfg, wins, preds, ctx) -> dict[str, Any] | None:
    fit = fit_probe(reader, wm, cfg)
    if fit is None:
        return None
    W, proj, xm, ym = fit
    out: dict[str, Any] = {}
    for cond, pred in preds.items():
        win = wins["labelled" if cond != "action_free" else "free"]
        st = win.frame_states[:, ctx:]
        row = {"true_latents": {}, "predicted_latents": {}}
        for h in cfg.horizons:
            y = st[:, h - 1]
            if not np.isfinite(y).all() or y.shape[1] == 0:
                continue
            row["true_latents"][h] = r2(y, (_probe_features(wm, win.tokens[:, ctx + h - 1], proj) - xm) @ W + ym)
            row["predicted_latents"][h] = r2(y, (_probe_features(wm, pred[:, h - 1], proj) - xm) @ W + ym)
        out[cond] = row
    return out
