"""Do these tokens see the scene? A linear probe from frozen tokens to the simulator's state (`wmctl probe`).

For a source recorded in a simulator (its dataset keeps `observation.environment_state`), every sampled frame's
state is turned into named targets by the simulator (`Simulator.probe_targets`: pusht's agent and block x/y and
the block angle as sin/cos; Meta-World's end-effector and object xyz). A kernel ridge regression from the frame's
patch tokens (all cameras, flattened and standardised: `raw`; or any other view of them, e.g. what a trained
model's input layer makes of them) is scored by 5-fold cross-validation over whole episodes: each fold's episodes
are predicted by a fit on the others (its strength chosen on held-out episodes of those), and R^2 per target is
taken over the pooled out-of-fold predictions. A demo's val split holds a handful of episodes; the folds use all.
Two kernels: `linear` (a linear read-out of the tokens) and `rbf` (a smooth non-linear one: what a small learned
head could decode, e.g. an angle a linear map cannot).

The fit is in dual form (an n x n kernel), so token grids of any size cost the same: n = sampled frames.
A 2x2 merge of the tokens (the `small` preset's) is a reshape: a ridge on merged tokens is the same fit as on the raw
ones, so `raw` answers for both; what a model keeps after its input projection is the `model` view (`wmctl eval`).

Legend: N = frames, C = cameras, P = patch tokens per camera, D = token width, F = features.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.reader import TokenReader
from pipeline.lerobot_io import DataFileCache, stack_column
from pipeline.manifest import read_manifest
from pipeline.sims import ENV_STATE_KEY, make_sim, recorded_sim
from pipeline.stage import UserError

log = logging.getLogger(__name__)

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

Features = Callable[[np.ndarray], np.ndarray]  # patch tokens [N, C, P, D] -> features [N, F]


def flat_tokens(patch_NCPD: np.ndarray) -> np.ndarray:
    """The `raw` view: every patch token of every camera, flattened (float32)."""
    return np.asarray(patch_NCPD, dtype=np.float32).reshape(len(patch_NCPD), -1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    store: Path
    source: str | None = None  # default: every source recorded in a simulator
    max_frames: int = 4000  # sampled evenly over the episodes (the kernel is max_frames^2)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_frames < 50:
            raise UserError("--max-frames: the probe needs at least 50 frames")


@dataclasses.dataclass
class ProbeData:
    """Sampled frames of one source: tokens, targets and episode of each frame."""

    source: str
    sim: str
    patch_NCPD: np.ndarray
    targets: dict[str, np.ndarray]
    episode_N: np.ndarray


def probe_sources(reader: TokenReader) -> dict[str, str]:
    """{source: simulator} for the store's sources whose datasets were recorded in a known simulator."""
    out = {}
    for src in reader.sources:
        root = reader.source_attrs(src).get("root")
        if root and (sim := recorded_sim(Path(root))):
            out[src] = sim
    return out


def _sample(n_frames: np.ndarray, budget: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Frame indices per episode, about `budget` in all, spread evenly over the episodes."""
    per = max(1, budget // max(1, len(n_frames)))
    return [np.sort(rng.choice(n, size=min(per, n), replace=False)) for n in n_frames]


def load_probe_data(reader: TokenReader, source: str, sim_name: str, cfg: ProbeConfig) -> ProbeData:
    """Patch tokens and simulator targets of sampled frames of `source`'s train and val episodes."""
    attrs = reader.source_attrs(source)
    eps = reader.episodes[(reader.episodes.source == source) & ~reader.episodes.augmented]
    manifest, meta = read_manifest(Path(attrs["manifest"]))
    files = {int(r.episode_index): r.data_file for r in manifest.itertuples()}
    rng = np.random.default_rng(cfg.seed)
    data = DataFileCache(columns=[ENV_STATE_KEY])
    size = int(meta["features"][attrs["cameras"][0]]["shape"][0])
    sim = make_sim(sim_name, size, fps=int(meta.get("fps") or 0) or None, camera_keys=list(attrs["cameras"]))
    patches, states, episode = [], [], []
    if eps.episode_index.nunique() < 5:
        raise UserError(f"{reader.path}: source {source} has {eps.episode_index.nunique()} episodes; the probe holds "
                        "out whole episodes in 5 folds and needs at least 5")
    try:
        for (row, e), idx in zip(eps.iterrows(), _sample(eps.length.to_numpy(), cfg.max_frames, rng)):
            d = reader.episode(int(row), ("patch", "frame_index"))
            df = data.rows_in_file(Path(attrs["root"]) / files[int(e.episode_index)], int(e.episode_index))
            if ENV_STATE_KEY not in df:
                raise UserError(f"{attrs['root']} has no {ENV_STATE_KEY}: the probe needs a dataset recorded in a "
                                "simulator (`wmctl data`)")
            st = stack_column(df, ENV_STATE_KEY).astype(np.float64)
            fi = np.asarray(d["frame_index"])[idx].astype(int)
            patches.append(np.asarray(d["patch"][idx]))
            states.append(st[fi])
            episode.append(np.full(len(idx), int(e.episode_index)))
        targets = sim.probe_targets(np.concatenate(states))
    finally:
        sim.close()
    return ProbeData(source, sim_name, np.concatenate(patches), targets, np.concatenate(episode))


def r2(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """R^2 per column against the column's own mean (1: exact; 0: no better than the mean; < 0: worse)."""
    ss_res = ((pred - true) ** 2).sum(0)
    ss_tot = ((true - true.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.maximum(ss_tot, 1e-12)


def _centered(G: np.ndarray, rows: np.ndarray, cols: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """The block (rows, cols) of kernel G centred on the mean of the `fit` rows in feature space:
    <x_i - m, x_j - m> = G_ij - a_i - a_j + c, with a_i = mean_k G_ik over fit rows and c their mean."""
    a = G[:, fit].mean(1)
    c = a[fit].mean()
    return G[np.ix_(rows, cols)] - a[rows, None] - a[None, cols] + c


def _kernel_ridge(G: np.ndarray, Y: np.ndarray, fit: np.ndarray, pred: np.ndarray, lam: float) -> np.ndarray:
    """Kernel ridge fit on rows `fit`, predictions on rows `pred` (targets centred on the fit rows' mean; the
    strength relative to the kernel's mean diagonal)."""
    K = _centered(G, fit, fit, fit)
    alpha = np.linalg.solve(K + lam * max(np.trace(K) / len(fit), 1e-12) * np.eye(len(fit)), Y[fit] - Y[fit].mean(0))
    return _centered(G, pred, fit, fit) @ alpha + Y[fit].mean(0)


def split_groups(groups: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    ids = rng.permutation(np.unique(groups))
    return [f for f in np.array_split(ids, min(k, len(ids))) if len(f)]


def _choose(G: np.ndarray, Y: np.ndarray, train: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> float:
    """The ridge strength with the best R^2 on a fifth of the train groups held out (nested inside a fold)."""
    held_groups = split_groups(groups[train], 5, rng)[0]
    held = train[np.isin(groups[train], held_groups)]
    fit = train[~np.isin(groups[train], held_groups)]
    scores = [r2(_kernel_ridge(G, Y, fit, held, lam), Y[held]).mean() for lam in RIDGE_GRID]
    return RIDGE_GRID[int(np.argmax(scores))]


def gram(X: np.ndarray, kernel: str) -> np.ndarray:
    """[N, N] Gram matrix of standardised features: `linear` (<x, y>) or `rbf` (exp(-|x - y|^2 / median))."""
    X = np.asarray(X, dtype=np.float64)
    X = (X - X.mean(0)) / np.maximum(X.std(0), 1e-6)
    G = X @ X.T
    if kernel == "linear":
        return G
    if kernel != "rbf":
        raise ValueError(f"kernel {kernel!r}: linear or rbf")
    d = np.diag(G)
    D = np.maximum(d[:, None] + d[None, :] - 2 * G, 0.0)
    return np.exp(-D / max(float(np.median(D[np.triu_indices(len(D), 1)])), 1e-12))


def cross_validated_r2(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, *, kernel: str = "linear", folds: int = 5,
                       seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold R^2 per target: the episodes (`groups`) split into `folds`, each predicted by a kernel ridge fit
    on the others (its strength chosen on held-out episodes of those), R^2 of the pooled out-of-fold predictions.
    Returns (R^2 per target, the strength chosen per fold)."""
    rng = np.random.default_rng(seed)
    G = gram(X, kernel)
    pred = np.zeros_like(Y, dtype=np.float64)
    lams = []
    for test_groups in split_groups(groups, folds, rng):
        test = np.flatnonzero(np.isin(groups, test_groups))
        train = np.flatnonzero(~np.isin(groups, test_groups))
        lam = _choose(G, Y, train, groups, rng)
        pred[test] = _kernel_ridge(G, Y, train, test, lam)
        lams.append(lam)
    return r2(pred, Y), lams


def probe_source(data: ProbeData, views: dict[str, Features], seed: int = 0,
                 kernels: tuple[str, ...] = ("linear", "rbf")) -> dict[str, Any]:
    """Out-of-fold R^2 per target for each view of the tokens and each kernel (folds of whole episodes)."""
    names = list(data.targets)
    Y = np.stack([data.targets[k] for k in names], 1).astype(np.float64)
    out: dict[str, Any] = {"source": data.source, "sim": data.sim, "frames": len(Y),
                           "episodes": int(len(np.unique(data.episode_N))), "folds": 5, "views": {}}
    for view, features in views.items():
        X = features(data.patch_NCPD)
        for kernel in kernels:
            scores, lams = cross_validated_r2(X, Y, data.episode_N, kernel=kernel, seed=seed)
            out["views"][f"{view}/{kernel}"] = {"r2": {k: float(v) for k, v in zip(names, scores)}, "ridge": lams,
                                                "features": int(X.shape[1])}
    return out


def run_probe(cfg: ProbeConfig, views: dict[str, Features] | None = None) -> dict[str, Any]:
    """The probe of every simulator-recorded source of the store (or `cfg.source`)."""
    reader = TokenReader(cfg.store)
    found = probe_sources(reader)
    if cfg.source is not None:
        if cfg.source not in reader.sources:
            raise UserError(f"{cfg.store}: no source {cfg.source!r} (it has {reader.sources})")
        if cfg.source not in found:
            raise UserError(f"source {cfg.source!r} was not recorded in a simulator `wmctl data` knows: nothing to "
                            "probe against (its dataset needs observation.environment_state and a generator record)")
        found = {cfg.source: found[cfg.source]}
    if not found:
        raise UserError(f"{cfg.store} has no source recorded in a simulator: nothing to probe against")
    enc = reader.encoder
    result = {"store": str(cfg.store), "encoder": {k: enc.get(k) for k in ("model_id", "description",
                                                                           "random_weights", "grid", "dim")},
              "image_size": [enc["preprocess"]["height"], enc["preprocess"]["width"]], "sources": {}}
    for src, sim in found.items():
        data = load_probe_data(reader, src, sim, cfg)
        result["sources"][src] = probe_source(data, views or {"raw": flat_tokens}, cfg.seed)
    return result
