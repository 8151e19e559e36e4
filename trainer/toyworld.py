"""A token world with known dynamics and a known predictive distribution, to test what a world model learns.

Tokens are made directly (no video, no encoder) and written into a real token store: a 4x4 grid of 16-wide
patch tokens over a fixed random background, with
- an agent blob at a 2-D position (the state), moved by each action (a 2-D delta, clipped to the grid): fully
  predictable given the actions, unpredictable without them;
- a distractor blob that sits, each frame independently, at one of two places with probability 1/2: the
  irreducible part, a two-point mixture whose mean and spread are known exactly;
- Gaussian noise of std 0.05 on every value.
So for any context and actions the true next-frame distribution is known: its mean (`true_mean`), its
per-value variance (`true_variance`) and samples (`true_samples`), in the store's raw token units.

An option (`Gate`, off by default: the world above unchanged) adds action-dependent two-way outcomes: a move whose
destination lies inside a disk (the gate) goes through with probability `through` (the agent lands where it aimed)
and else falls into a pit (the agent lands at `trap`). The next frame is then a mixture over the two positions:
`outcomes` gives them exactly, `next_mean` / `next_variance` / `next_samples` the next frame's distribution given the
position before and the move. A model trained with MSE learns the mixture's mean, half an agent at the aimed place
and half in the pit: `scripts/toy_two_way.py` plans on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore.synthetic import write_episode_tokens
from pipeline.stage import UserError

GRID, DIM = (4, 4), 16
NOISE = 0.05
ACTION_RANGE = 0.6  # default: each action a 2-D delta uniform in [-ACTION_RANGE, ACTION_RANGE]^2
DISTRACTOR_AT = (np.array([0.5, 0.5]), np.array([2.5, 2.5]))
IDENTITY = {"model_id": "toy-token-world", "weights_sha256": "0" * 64, "random_weights": True,
            "grid": list(GRID), "dim": DIM, "patch_size": 16, "num_register_tokens": 0,
            "preprocess": {"height": 64, "width": 64, "resize": "crop"}}


def bump(pos_2: np.ndarray) -> np.ndarray:
    """How much of a blob at `pos` [..., 2] each of the grid's tokens carries [..., P]."""
    rows, cols = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    pos_2 = np.asarray(pos_2)
    d2 = (rows.ravel() - pos_2[..., 0, None]) ** 2 + (cols.ravel() - pos_2[..., 1, None]) ** 2
    return np.exp(-d2 / 0.8)


@dataclass(frozen=True)
class Gate:
    """Two-way outcomes: a move whose destination lies within `radius` of `center` lands there with probability
    `through`, else at `trap` (the pit: any point, on the grid or off it)."""

    center: tuple[float, float] = (1.5, 1.5)
    radius: float = 0.8
    through: float = 0.5
    trap: tuple[float, float] = (0.0, 3.0)

    def __post_init__(self) -> None:
        if self.radius <= 0 or not 0 < self.through < 1:
            raise ValueError(f"gate radius {self.radius} must be positive and through {self.through} in (0, 1)")

    def holds(self, pos_N2: np.ndarray) -> np.ndarray:
        """Whether each position [..., 2] lies inside the gate."""
        return np.linalg.norm(np.asarray(pos_N2) - np.asarray(self.center), axis=-1) < self.radius

    def to_json(self) -> dict:
        return {"center": list(self.center), "radius": self.radius, "through": self.through, "trap": list(self.trap)}

    @classmethod
    def from_json(cls, d: dict) -> Gate:
        return cls(tuple(d["center"]), float(d["radius"]), float(d["through"]), tuple(d["trap"]))


@dataclass(frozen=True)
class ToyWorld:
    background: np.ndarray  # [P, Z]
    agent: np.ndarray  # [Z] the agent blob's feature
    distractor: np.ndarray  # [Z]
    action_range: float = ACTION_RANGE  # actions uniform in [-action_range, action_range]^2: how much they decide
    gate: Gate | None = None  # two-way outcomes of moves into the gate (None: every move deterministic)

    @classmethod
    def make(cls, seed: int = 0, action_range: float = ACTION_RANGE, gate: Gate | None = None) -> ToyWorld:
        """The world of `seed` (its background and blobs); `action_range` sets how far one action moves the agent
        and so how much of the next frame the actions explain (the null action's floor against the oracle's);
        `gate`: the two-way outcomes (the same background and blobs with or without)."""
        if action_range <= 0:
            raise ValueError(f"action_range {action_range} must be positive")
        rng = np.random.default_rng(seed)
        P = GRID[0] * GRID[1]
        return cls(rng.standard_normal((P, DIM)) * 0.5, rng.standard_normal(DIM), rng.standard_normal(DIM),
                   float(action_range), gate)

    def coin(self, rng: np.random.Generator, shape=()) -> np.ndarray | None:
        """The uniform draws [shape] that decide the gate's outcomes of a move (None without a gate: no draw)."""
        return None if self.gate is None else rng.random(shape)

    def move(self, pos_N2: np.ndarray, action_N2: np.ndarray, coin_N: np.ndarray | float | None) -> np.ndarray:
        """Where the agent lands [..., 2]: `step`, and a destination inside the gate goes through where its
        `coin` (uniform in [0, 1), from `coin`) is below `through`, else lands in the pit."""
        dest = step(pos_N2, action_N2)
        if self.gate is None:
            return dest
        fall = self.gate.holds(dest) & (np.asarray(coin_N) >= self.gate.through)
        return np.where(fall[..., None], np.asarray(self.gate.trap, dtype=dest.dtype), dest)

    def outcomes(self, pos_2: np.ndarray, actions_H2: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """The exact distribution of the agent's position after the moves `actions` [H, 2] (or one [2]) from
        `pos`: (probability, position) pairs, one per branch (two per move into the gate)."""
        branches = [(1.0, np.asarray(pos_2, dtype=np.float64))]
        for a in np.atleast_2d(actions_H2):
            nxt = []
            for prob, pos in branches:
                dest = step(pos, a)
                if self.gate is None or not self.gate.holds(dest):
                    nxt.append((prob, dest))
                else:
                    g = self.gate
                    nxt += [(prob * g.through, dest), (prob * (1 - g.through), np.array(g.trap, dtype=np.float64))]
            branches = nxt
        return branches

    def action(self, rng: np.random.Generator, shape=(2,)) -> np.ndarray:
        """Actions of the data's distribution."""
        return rng.uniform(-self.action_range, self.action_range, shape)

    def frame(self, pos_2: np.ndarray, where: int, rng: np.random.Generator | None) -> np.ndarray:
        """Tokens [P, Z] with the agent at `pos` (positions [..., 2]: frames [..., P, Z]), the distractor at place
        `where`, noise from `rng` (None: none)."""
        x = self.background + bump(pos_2)[..., None] * self.agent + bump(DISTRACTOR_AT[where])[:, None] * \
            self.distractor
        return x if rng is None else x + NOISE * rng.standard_normal(x.shape)

    def true_mean(self, pos_2: np.ndarray) -> np.ndarray:
        """E[tokens | agent at pos] [P, Z]: the distractor's two places averaged, no noise."""
        return (self.frame(pos_2, 0, None) + self.frame(pos_2, 1, None)) / 2

    def null_action_mean(self, pos_2: np.ndarray, steps: int, rng: np.random.Generator, draws: int = 256
                         ) -> np.ndarray:
        """E[tokens `steps` frames after the agent was at `pos` | the actions unknown] [P, Z] (Monte Carlo over
        `draws` action sequences of the data's distribution): the best a model without the actions can do."""
        pos = np.repeat(pos_2[None], draws, axis=0)
        for _ in range(steps):
            pos = self.move(pos, self.action(rng, pos.shape), self.coin(rng, draws))
        return np.mean([self.true_mean(p) for p in pos], axis=0)

    def true_variance(self) -> np.ndarray:
        """Var[tokens | agent position] per value [P, Z]: the two-point mixture's plus the noise's."""
        half = (bump(DISTRACTOR_AT[0]) - bump(DISTRACTOR_AT[1]))[:, None] * self.distractor / 2
        return half**2 + NOISE**2

    def true_samples(self, pos_2: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """n draws [n, P, Z] of the next frame given the agent's (known) position."""
        return np.stack([self.frame(pos_2, int(rng.integers(2)), rng) for _ in range(n)])

    def next_mean(self, pos_2: np.ndarray, actions_H2: np.ndarray) -> np.ndarray:
        """E[tokens after the moves `actions` from `pos`] [P, Z]: `true_mean` over the branches of `outcomes`."""
        return sum(prob * self.true_mean(q) for prob, q in self.outcomes(pos_2, actions_H2))

    def next_variance(self, pos_2: np.ndarray, actions_H2: np.ndarray) -> np.ndarray:
        """Var[tokens after the moves `actions` from `pos`] per value [P, Z]: the variance within a branch
        (`true_variance`) plus that of the branches' means."""
        branches = self.outcomes(pos_2, actions_H2)
        second = sum(prob * self.true_mean(q) ** 2 for prob, q in branches)
        return self.true_variance() + second - self.next_mean(pos_2, actions_H2) ** 2

    def next_samples(self, pos_2: np.ndarray, actions_H2: np.ndarray, n: int, rng: np.random.Generator
                     ) -> np.ndarray:
        """n draws [n, P, Z] of the frame after the moves `actions` from `pos`, each move's outcome drawn."""
        out = []
        for _ in range(n):
            pos = np.asarray(pos_2, dtype=np.float64)
            for a in np.atleast_2d(actions_H2):
                pos = self.move(pos, a, self.coin(rng))
            out.append(self.frame(pos, int(rng.integers(2)), rng))
        return np.stack(out)


def step(pos_2: np.ndarray, action_2: np.ndarray) -> np.ndarray:
    return np.clip(pos_2 + action_2, 0, GRID[0] - 1)


def write_toy_world(path: Path, *, episodes: int = 64, length: int = 24, seed: int = 0, labelled: bool = True,
                    source: str = "toy", val_every: int = 8, action_range: float = ACTION_RANGE,
                    gate: Gate | None = None) -> Path:
    """Episodes of the toy world (random actions in +-`action_range`; with `gate`, its two-way outcomes) as one
    committed segment of `source`; the state is the agent position, so the truth of any window can be rebuilt.
    Every `val_every`-th episode is val. The store records its world (the action range, the gate) in its
    identity: `measure` rebuilds that world, and a store refuses episodes of another one."""
    world = ToyWorld.make(0, action_range, gate)  # the same world for every source and seed: seeds vary episodes
    rng = np.random.default_rng(seed)
    patch, action, state, table = [], [], [], []
    for e in range(episodes):
        pos = rng.uniform(0, GRID[0] - 1, 2)
        for _ in range(length):
            a = world.action(rng)
            patch.append(world.frame(pos, int(rng.integers(2)), rng))
            state.append(pos.copy())
            action.append(a)
            pos = world.move(pos, a, world.coin(rng))
        table.append({"episode_index": e, "view": 0, "start": e * length, "length": length,
                      "split": "val" if e % val_every == val_every - 1 else "train", "has_actions": labelled,
                      "task": "move the agent", "augment": None})
    return write_episode_tokens(path, identity_of(world), source=source, patch_FPZ=np.stack(patch),
                                action_FA=np.stack(action), state_FS=np.stack(state), table=table, labelled=labelled)


def identity_of(world: ToyWorld) -> dict:
    """The store identity of a toy world's tokens: the toy 'encoder' and the world they come from."""
    gate = {} if world.gate is None else {"gate": world.gate.to_json()}
    return dict(IDENTITY, world={"seed": 0, "action_range": world.action_range, **gate})


def world_of(store: Path) -> ToyWorld:
    """The world a toy store's tokens come from (stores written before the identity recorded it: the default)."""
    from featurestore.reader import TokenReader

    recorded = TokenReader(store).encoder
    if recorded.get("model_id") != IDENTITY["model_id"]:
        raise UserError(f"{store}: not a toy-world store (its tokens come from {recorded.get('model_id')!r})")
    world = recorded.get("world", {})
    gate = Gate.from_json(world["gate"]) if "gate" in world else None
    return ToyWorld.make(0, float(world.get("action_range", ACTION_RANGE)), gate)


def measure(wm, store: Path, *, context: int = 3, horizons: tuple[int, ...] = (1, 3), samples: int = 8,
            ks: tuple[int, ...] = (1, 2, 4, 8), null_k: int = 4, windows_per_episode: int = 4, seed: int = 0) -> dict:
    """What `wm` (a LoadedWorldModel trained on the toy world) gets right, against the exact answer, on the val
    windows of `store`, per horizon (normalised tokens, the model's statistics):
    - `oracle_mse`: the true conditional mean's MSE (the floor of any point prediction), `oracle_energy`: the
      energy score of `samples` draws from the true distribution (the floor of any sampler of that size);
    - per K: `mse` of the mean of `samples` samples, `mse_single`, `mse_mean_inf` (the error of the model's own
      mean prediction, the mean of infinitely many samples, estimated without bias from the two: the number to
      hold against `oracle_mse`), `energy`, and `spread`: the samples' per-value variance over the true variance
      (1 = calibrated, > 1 over-dispersed);
    - `null_mse`: the MSE of the mean of `samples` samples at K=`null_k` with the null action (the agent's move
      unknown; the same statistic as `mse` with the actions), next to `oracle_null_mse`, the error of the true
      conditional mean without the actions (its floor): the model uses its actions if `mse` is well below
      `null_mse`; how far below it can be is `oracle_mse` / `oracle_null_mse`."""
    from featurestore.reader import TokenReader
    from trainer.eval import EvalConfig, collect_windows, mean_prediction_mse, sample_set, window_scores

    world = world_of(store)
    if world.gate is not None:
        raise UserError(f"{store}: a world with a gate; measure's oracle conditions on the realised position, which "
                        "a move into the gate leaves open (its truth is `ToyWorld.outcomes`; scripts/toy_two_way.py)")
    reader = TokenReader(store)
    cfg = EvalConfig(ckpt=wm.checkpoint, horizons=horizons, windows_per_episode=windows_per_episode, seed=seed,
                     samples=samples, batch_size=64)
    (win,) = collect_windows(reader, wm, cfg, context)["labelled"]  # the toy store's one labelled source
    mean, std = wm.stats.token_mean.astype(np.float64), wm.stats.token_std.astype(np.float64)
    norm = lambda x: (np.asarray(x, np.float64) - mean) / std  # noqa: E731
    W = len(win.tokens)
    rng = np.random.default_rng(seed)
    draws = {k: sample_set(wm, win, context, cfg, use_actions=True, k=k) for k in ks}  # [S, W, len(horizons), P, Z]
    null_k = null_k if wm.sampler else 1
    null = sample_set(wm, win, context, cfg, use_actions=False, k=null_k).mean(0)  # [W, len(horizons), P, Z]
    true_var = float((world.true_variance() / std**2).mean())
    out: dict = {"windows": W, "samples": samples, "context": context, "true_variance": true_var, "horizons": {}}
    for j, h in enumerate(horizons):
        truth = norm(win.tokens[:, context + h - 1])  # [W, P, Z]
        pos = win.frame_states[:, context + h - 1]  # the agent's true position at that frame
        oracle_mean = norm(np.stack([world.true_mean(p) for p in pos]))
        oracle_draws = norm(np.stack([world.true_samples(p, samples, rng) for p in pos], axis=1))  # [S, W, P, Z]
        start = win.frame_states[:, context - 1]  # where the agent was at the last context frame
        oracle_null = norm(np.stack([world.null_action_mean(p, h, rng) for p in start]))
        row = {"oracle_mse": float(((oracle_mean - truth) ** 2).mean()),
               "oracle_energy": float(window_scores(oracle_draws, truth)["energy"].mean()),
               "oracle_null_mse": float(((oracle_null - truth) ** 2).mean()),
               "null_mse": float(((norm(null[:, j]) - truth) ** 2).mean()), "null_k": null_k, "k": {}}
        for k in ks:
            x = norm(draws[k][:, :, j])
            sc = window_scores(x, truth)
            spread = float(x.var(axis=0, ddof=1 if len(x) > 1 else 0).mean()) / true_var  # one draw: none
            mse, single = float(sc["mse"].mean()), float(sc["mse_single"].mean())
            row["k"][k] = {"mse": mse, "mse_single": single, "mse_mean_inf": mean_prediction_mse(mse, single, len(x)),
                           "energy": float(sc["energy"].mean()), "spread": spread}
        out["horizons"][h] = row
    return out
