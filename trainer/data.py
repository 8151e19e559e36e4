"""Training data from the token store: normalisation statistics, a stateless window sampler, batches.

The sampler is a pure function of (seed, step): the global batch of step s is drawn from
`np.random.default_rng([seed, s])` and rank r takes samples [r*B, (r+1)*B). Resuming at step s therefore
continues exactly, any number of DataLoader workers give the same batches, and 2 ranks x B equal one
process x 2B. Each window's source is drawn by the mix weights (`TrainConfig.mix_weights`, normalised over the
training sources), then a window uniformly among that source's; a labelled source's windows get its actions, an
action-free source's the null action. With `labelled_fraction` set, labelled and action-free windows are mixed
at that share instead. Legend: B = batch, T = frames, N = tokens per frame (cameras x grid), Z = width.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from featurestore.reader import TokenReader, Window
from pipeline.stage import UserError
from trainer.actions import ActionSpace
from trainer.config import TrainConfig
from trainer.tokens import TokenShape, pack_state

log = logging.getLogger(__name__)

# batch keys
Z, ACTIONS, VALID, LABELLED, SAMPLE_IDS, STEP = "z", "actions", "action_valid", "labelled", "sample_ids", "step"
PRESENT = "cameras_present"  # [B, C] which camera slots each sample's source has
EMBODIMENT = "embodiment"  # [B] each sample's robot (proprioception across robots)
MIX = "mix"


@dataclasses.dataclass
class Stats:
    """Per-channel normalisation: tokens (over all cameras and positions) and raw actions."""

    token_mean: np.ndarray  # [Z]
    token_std: np.ndarray  # [Z]
    action_mean: np.ndarray  # [A_raw]
    action_std: np.ndarray  # [A_raw]
    frame_delta_var: np.ndarray  # [1]: mean squared change of a normalised token from one model frame to the next
    # (frameskip store frames apart); the normalised state is scaled to change as much
    # [S] (proprio): the state's mean, and its scale (its std shrunk so that it changes per frame like a patch);
    # [E, S] with several embodiments: each robot's own, in its first channels (the rest 0 / 1)
    state_mean: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    state_std: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(0, np.float32))

    def state_stats(self, embodiment: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) [S] of one embodiment's state."""
        if self.state_mean.ndim == 1:
            return self.state_mean, self.state_std
        return self.state_mean[embodiment], self.state_std[embodiment]

    def to_dict(self) -> dict[str, list[float]]:
        return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Stats:
        return cls(**{k: np.asarray(v, dtype=np.float32) for k, v in d.items()})


def action_space(cfg: TrainConfig, stats: Stats) -> ActionSpace:
    """The run's action conversions (dataset <-> model <-> environment) with its statistics."""
    return ActionSpace(cfg.action_mode, cfg.frameskip, stats.action_mean, stats.action_std, cfg.action_kinds)


def select_episodes(reader: TokenReader, cfg: TrainConfig, split: str) -> pd.DataFrame:
    eps = reader.episodes
    if cfg.sources:
        eps = eps[eps.source.isin(cfg.sources)]
    eps = eps[eps.split == split]
    if split != "train" or not cfg.include_augmented:
        eps = eps[eps.view == 0]
    return eps


def compute_stats(reader: TokenReader, cfg: TrainConfig, shape: TokenShape) -> Stats:
    """Token mean/std from up to `stats_frames` random train frames (in pairs one model frame apart, for the
    frame-to-frame change); action and state mean/std from all labelled / all train frames."""
    eps = select_episodes(reader, cfg, "train")
    rng = np.random.default_rng([cfg.seed, 7])
    per_ep = max(1, cfg.stats_frames // (2 * max(1, len(eps))))
    s1 = np.zeros(shape.enc_dim)
    s2 = np.zeros(shape.enc_dim)
    d2 = np.zeros(shape.enc_dim)  # squared differences of frames one model step (frameskip) apart
    n = 0
    for row in rng.permutation(eps.index.to_numpy()):
        e = reader.episodes.loc[row]
        fs = cfg.frameskip_of(str(e.source))  # one model frame of this source
        if int(e.length) <= fs:
            continue
        k = min(per_ep, int(e.length) - fs)
        for start in np.sort(rng.choice(int(e.length) - fs, size=k, replace=False)):
            pair = reader.read(Window(int(row), int(start), 2, fs), ("patch",))["patch"].astype(np.float64)
            pair = pair.reshape(2, -1, shape.enc_dim)
            s1 += pair.sum((0, 1))
            s2 += (pair**2).sum((0, 1))
            d2 += ((pair[1] - pair[0]) ** 2).sum(0)
            n += pair.shape[1]
        if 2 * n >= cfg.stats_frames * shape.tokens:
            break
    if n == 0:
        raise UserError(f"{reader.path}: no train episode is longer than one model frame (frameskip "
                        f"{cfg.frameskip}); cannot compute statistics")
    mean = s1 / (2 * n)
    std = np.sqrt(np.maximum(s2 / (2 * n) - mean**2, 1e-12))
    delta_var = float(np.mean(d2 / n / std**2))
    a_raw = shape.action_dim // (1 if cfg.action_kinds else cfg.frameskip)
    space = ActionSpace(cfg.action_mode, cfg.frameskip, np.zeros(a_raw), np.ones(a_raw), cfg.action_kinds)  # the
    # transforms only
    acts = [reader.episode(int(r), ("action", "action_valid", "state")) for r in eps[eps.has_actions].index]
    valid = [_model_actions(space, x) for x in acts]
    if a_raw and valid and sum(len(v) for v in valid):
        allv = np.concatenate(valid)
        a_mean, a_std = allv.mean(0), np.maximum(allv.std(0), 1e-6)
    else:
        a_mean, a_std = np.zeros(a_raw), np.ones(a_raw)
    s_mean, s_std = np.zeros(0), np.ones(0)
    if shape.state_dim:
        bodies = shape.embodiments or (("", shape.state_dim),)
        body_of = np.array([shape.embodiment_of(str(src)) for src in eps.source], dtype=np.int64)
        per_body = [_state_stats(reader, eps[body_of == e], w, cfg, delta_var, name)
                    for e, (name, w) in enumerate(bodies)]
        if len(per_body) == 1:
            s_mean, s_std = per_body[0]
        else:  # one row per robot, its own statistics in its first channels
            s_mean, s_std = np.zeros((len(bodies), shape.state_dim)), np.ones((len(bodies), shape.state_dim))
            for e, (m, sd) in enumerate(per_body):
                s_mean[e, : len(m)], s_std[e, : len(sd)] = m, sd
    return Stats(mean.astype(np.float32), std.astype(np.float32), a_mean.astype(np.float32),
                 a_std.astype(np.float32), np.array([delta_var], dtype=np.float32), s_mean.astype(np.float32),
                 s_std.astype(np.float32))


def _model_actions(space: ActionSpace, ep: dict[str, np.ndarray]) -> np.ndarray:
    """An episode's valid actions in the model's raw space [n, A]: per step, or with `space.kinds` per model
    frame (the frameskip steps from every start, added up by kind; only runs of valid steps)."""
    steps = space.from_dataset(ep["action"].astype(np.float32), ep["state"])
    ok = ep["action_valid"].astype(bool)
    if not space.kinds or space.frameskip == 1:
        return steps[ok]
    k, n = space.frameskip, len(steps) - space.frameskip + 1
    if n < 1:
        return steps[:0]
    idx = np.arange(n)[:, None] + np.arange(k)[None]  # [n, k]: every run of k steps
    frames = space.per_frame(steps[idx].reshape(n * k, -1))  # [n, A]
    return frames[ok[idx].all(1)]


def _state_stats(reader: TokenReader, eps: pd.DataFrame, width: int, cfg: TrainConfig, delta_var: float,
                 name: str) -> tuple[np.ndarray, np.ndarray]:
    """One robot's state mean and scale over its train episodes (its change over one model frame of each)."""
    per = [reader.episode(int(r), ("state",))["state"][:, :width].astype(np.float64) for r in eps.index]
    skips = cfg.frameskips(eps.source)
    states = np.concatenate(per) if per else np.zeros((0, width))
    states = states[np.isfinite(states).all(1)]
    if not len(states):
        raise UserError(f"{reader.path}: the train episodes{' of ' + name if name else ''} have no finite states; "
                        "train with --set proprio=false")
    s_mean, s_std = states.mean(0), np.maximum(states.std(0), 1e-6)
    # Scale the state so that it changes from frame to frame as much as a patch token does: a robot's state
    # moves a few % of its range per frame, and at unit variance the context noise (ctx_noise) would bury
    # that motion; at this scale the noise is as small against the state's motion as against the patches'.
    steps = [((x[fs:] - x[:-fs]) / s_std) ** 2 for x, fs in zip(per, skips) if len(x) > fs]
    dv = float(np.nanmean(np.concatenate(steps))) if steps else float("nan")
    if np.isfinite(dv) and dv > 0:
        s_std = s_std * np.sqrt(dv / max(delta_var, 1e-6))
    return s_mean, s_std


@dataclasses.dataclass(frozen=True)
class Sample:
    row: int  # TokenReader.episodes row
    start: int
    labelled: bool  # actions are fed (False: the null action)
    sample_id: int  # global sample index: seeds the noise of this sample
    source: str = ""


class WindowSampler:
    """The global batch of every step, as a pure function of (seed, step)."""

    def __init__(self, reader: TokenReader, cfg: TrainConfig, split: str = "train"):
        self.cfg = cfg
        eps = select_episodes(reader, cfg, split)
        if eps.empty:
            raise UserError(f"no {split} episodes in {reader.path}")
        self.by_mix = cfg.labelled_fraction is None
        if self.by_mix:
            weights = dict(cfg.mix_weights)
            self.sources = sorted(str(s) for s in eps.source.unique())
            self.weights = np.array([weights.get(s, 1.0) for s in self.sources], dtype=np.float64)
            self.pools = {s: eps[eps.source == s] for s in self.sources}
        else:
            self.pools = {True: eps[eps.has_actions], False: eps[~eps.has_actions]}
            if cfg.labelled_fraction > 0 and self.pools[True].empty:
                log.warning("no labelled episodes: every window gets the null action")
            if cfg.labelled_fraction < 1 and self.pools[False].empty:
                log.warning("no action-free episodes: windows are labelled (null action only via action_dropout)")
        # per pool, each episode's length and its source's frameskip (fixed: not recomputed every step)
        self.lengths = {key: pool.length.to_numpy(np.int64) for key, pool in self.pools.items()}
        self.skips = {key: cfg.frameskips(pool.source) for key, pool in self.pools.items()}

    def global_batch(self, step: int, size: int, T: int | None = None) -> list[Sample]:
        T = T or self.cfg.context_at(step)
        rng = np.random.default_rng([self.cfg.seed, step])
        pick = rng.random(size)
        dropout = rng.random(size) < self.cfg.action_dropout
        u = rng.random(size)
        spans = {key: (T - 1) * skips + 1 for key, skips in self.skips.items()}  # store frames of a window
        fits = {key: self.lengths[key] >= spans[key] for key in self.pools}
        eligible = {key: pool[fits[key]] for key, pool in self.pools.items()}
        if all(ok.empty for ok in eligible.values()):
            raise UserError(f"no episode has the frames a window of {T} model frames needs ((T - 1) x frameskip + 1:"
                            f" {(T - 1) * self.cfg.frameskip + 1} at frameskip {self.cfg.frameskip}); lower "
                            "context_frames")
        cums = {key: np.cumsum((self.lengths[key] - spans[key] + 1)[fits[key]]) for key in self.pools}
        if self.by_mix:  # the source by weight (a source without a window this long drops out of the draw)
            w = self.weights * np.array([not eligible[s].empty for s in self.sources])
            if not w.sum():
                raise UserError(f"no source with a positive mix weight has an episode long enough for a window of {T}"
                                " frames; lower context_frames or change mix_weights")
            idx = np.searchsorted(np.cumsum(w / w.sum()), pick, side="right")
            keys = [self.sources[min(int(i), len(self.sources) - 1)] for i in idx]
        else:
            want = pick < self.cfg.labelled_fraction
            keys = [bool(x) if len(eligible[bool(x)]) else not x for x in want]
        out = []
        for i, key in enumerate(keys):
            ok, cum = eligible[key], cums[key]
            k = int(u[i] * cum[-1])
            j = int(np.searchsorted(cum, k, side="right"))
            start = k - (int(cum[j - 1]) if j else 0)
            e = ok.iloc[j]
            out.append(Sample(int(ok.index[j]), start, bool(e.has_actions and not dropout[i]), step * size + i,
                              str(e.source)))
        return out


def normalize_patches(patch: np.ndarray, stats: Stats, shape: TokenShape, cameras: int | None = None) -> np.ndarray:
    """Store patch tokens [..., C, P, Z] -> normalised patch latents [..., C * P, Z] (float32); C is `cameras` (a
    source's own count) or the model's. The camera axis is required, also for one camera: without it a one-frame
    [1, P, Z] could be frames or cameras."""
    p = np.asarray(patch, dtype=np.float32)
    want = (cameras or shape.cameras, shape.grid[0] * shape.grid[1])
    if p.ndim < 3 or p.shape[-3:-1] != want:
        raise ValueError(f"patch tokens of shape {p.shape}: expected [..., cameras {want[0]}, tokens {want[1]}, "
                         f"{p.shape[-1] if p.ndim else '?'}] (the store's layout, camera axis included)")
    p = p.reshape(*p.shape[:-3], -1, p.shape[-1])
    return ((p - stats.token_mean) / stats.token_std).astype(np.float32)


def latents(patch: np.ndarray, state: np.ndarray | None, stats: Stats, shape: TokenShape,
            cameras: int | None = None, embodiment: int = 0) -> np.ndarray:
    """Store patches [..., C, P, Z] (+ raw states [..., S]) -> normalised model latents [..., N(+1), Z]
    (the state token with proprioception; a missing (NaN) state reads as the mean state)."""
    return with_state(normalize_patches(patch, stats, shape, cameras), state, stats, shape, embodiment)


def with_state(z: np.ndarray, state: np.ndarray | None, stats: Stats, shape: TokenShape, embodiment: int = 0
               ) -> np.ndarray:
    """Normalised patch latents [..., N, Z] (+ raw states of an embodiment) -> model latents [..., N(+1), Z]:
    the state normalised with that robot's statistics in the state token's first channels (the rest 0)."""
    if not shape.state_dim:
        return z
    if state is None:
        raise ValueError("this model predicts the state (proprio): pass the states with the tokens")
    w = shape.state_width(embodiment)
    state = np.asarray(state, dtype=np.float32)
    if state.shape[-1] < w:
        raise ValueError(f"a state of width {state.shape[-1]}, the robot's is {w}")
    mean, scale = stats.state_stats(embodiment)
    s = np.zeros((*state.shape[:-1], shape.state_dim), dtype=np.float32)
    s[..., :w] = np.nan_to_num((state[..., :w] - mean[:w]) / scale[:w])
    return pack_state(torch.from_numpy(z), torch.from_numpy(s.astype(np.float32)), shape).numpy()


def load_sample(reader: TokenReader, s: Sample, T: int, cfg: TrainConfig, stats: Stats, shape: TokenShape
                ) -> dict[str, np.ndarray]:
    """One window: normalised latents [T, N, Z] (patches, + the state token with proprioception); normalised
    actions [T, A] where actions[t] led into frame t (the frameskip raw actions between frames t-1 and t,
    concatenated, or added up by kind); valid [T] (frame 0 never)."""
    frameskip = cfg.frameskip_of(s.source)
    span = (T - 1) * frameskip + 1
    w = reader.read(Window(s.row, s.start, T, frameskip), ("patch", "state") if shape.state_dim else ("patch",))
    slots = list(shape.slots_of(s.source))
    present = np.zeros(shape.cameras, dtype=bool)
    present[slots] = True
    z = normalize_patches(w["patch"], stats, shape, len(slots))  # [T, C_source * P, Z]
    if not present.all():  # into the model's slots: an absent slot stays zero and is masked (batch PRESENT)
        P, Zd = w["patch"].shape[2], z.shape[-1]
        full = np.zeros((T, shape.cameras, P, Zd), dtype=np.float32)
        full[:, slots] = z.reshape(T, len(slots), P, Zd)
        z = full.reshape(T, -1, Zd)
    body = shape.embodiment_of(s.source)
    z = with_state(z, w.get("state"), stats, shape, body)
    actions = np.zeros((T, shape.action_dim), dtype=np.float32)
    valid = np.zeros(T, dtype=bool)
    if s.labelled and shape.action_dim:
        lo = reader.read(Window(s.row, s.start, span), ("action", "action_valid", "state"))
        space = action_space(cfg, stats)
        steps = space.from_dataset(lo["action"].astype(np.float32), lo["state"])[: span - 1]  # [(T-1) fs, A_raw]
        actions[1:] = space.normalize_frames(space.per_frame(steps))  # frame t: the steps from frame t-1 to t
        valid[1:] = lo["action_valid"][: span - 1].reshape(T - 1, frameskip).all(1)
    return {Z: z.astype(np.float32), ACTIONS: np.nan_to_num(actions), VALID: valid, PRESENT: present,
            EMBODIMENT: body}


def collate(reader: TokenReader, samples: list[Sample], T: int, cfg: TrainConfig, stats: Stats,
            shape: TokenShape) -> dict[str, Any]:
    items = [load_sample(reader, s, T, cfg, stats, shape) for s in samples]
    batch = {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in (Z, ACTIONS, VALID)}
    present = np.stack([it[PRESENT] for it in items])
    if not present.all():  # only then: a batch of full frames runs without a mask (decided here, not on the device)
        batch[PRESENT] = torch.from_numpy(present)
    if len(shape.embodiments) > 1:
        batch[EMBODIMENT] = torch.tensor([it[EMBODIMENT] for it in items], dtype=torch.long)
    batch[LABELLED] = torch.tensor([s.labelled for s in samples])
    batch[SAMPLE_IDS] = torch.tensor([s.sample_id for s in samples], dtype=torch.long)
    return batch


class StepBatches(torch.utils.data.IterableDataset):
    """Yields this rank's batch for steps start, start+1, ... (DataLoader workers take every W-th step,
    and the loader interleaves them back in order)."""

    def __init__(self, reader: TokenReader, cfg: TrainConfig, stats: Stats, shape: TokenShape, *, start_step: int,
                 rank: int, world: int):
        self.reader, self.cfg, self.stats, self.shape = reader, cfg, stats, shape
        self.start_step, self.rank, self.world = start_step, rank, world
        self.sampler = WindowSampler(reader, cfg)

    def micro_batches(self, step: int) -> list[dict[str, Any]]:
        cfg = self.cfg
        B, acc = cfg.batch_size, cfg.grad_accum
        T = cfg.context_at(step)
        allb = self.sampler.global_batch(step, B * acc * self.world, T)
        mix = {s: 0.0 for s in getattr(self.sampler, "sources", ())}
        for smp in allb:
            mix[smp.source] = mix.get(smp.source, 0.0) + 1.0 / len(allb)
        out = []
        for m in range(acc):  # micro-batch m of every rank: a contiguous block of the global batch
            base = (m * self.world + self.rank) * B
            b = collate(self.reader, allb[base:base + B], T, cfg, self.stats, self.shape)
            b[STEP] = step
            if m == 0:
                b[MIX] = mix  # the realised share of each source in this step's global batch (logged)
            out.append(b)
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + wid
        while True:
            yield self.micro_batches(step)
            step += nw
