"""A synthetic token world written straight into a real Zarr token store (no video, no encoder).

One source of episodes: a blob sits on a grid of patch tokens over a fixed random background; its position is
the robot state, and each action moves it (a 2-D delta). Tokens are `background + bump(position) x feature +
noise`, so they are deterministic given the seed and the dynamics are known. Used by tests that must not depend
on video encoding or an encoder's floating point (golden numbers of the training loss).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore.synthetic import write_episode_tokens

IDENTITY = {"model_id": "synthetic-token-world", "weights_sha256": "0" * 64, "random_weights": True,
            "grid": [4, 4], "dim": 16, "patch_size": 16, "registers": 0,
            "preprocess": {"height": 64, "width": 64, "resize": "crop"}}


def _bump(pos_2: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    d2 = (rows.ravel() - pos_2[0]) ** 2 + (cols.ravel() - pos_2[1]) ** 2
    return np.exp(-d2 / 0.8)  # [P]


def write_token_world(path: Path, *, source: str = "world", episodes: int = 8, length: int = 24, seed: int = 0,
                      labelled: bool = True, val_every: int = 4) -> Path:
    """Write `episodes` episodes of `length` frames as one committed segment of `source` in the store `path`."""
    grid, dim = tuple(IDENTITY["grid"]), IDENTITY["dim"]
    P = grid[0] * grid[1]
    rng = np.random.default_rng(seed)
    background = rng.standard_normal((P, dim)) * 0.5
    feature = rng.standard_normal(dim)
    patch, action, state, table = [], [], [], []
    for e in range(episodes):
        pos = rng.uniform(0, grid[0] - 1, 2)
        for _ in range(length):
            a = rng.uniform(-0.6, 0.6, 2)
            patch.append(background + _bump(pos, grid)[:, None] * feature + 0.05 * rng.standard_normal((P, dim)))
            state.append(pos.copy())
            action.append(a)
            pos = np.clip(pos + a, 0, grid[0] - 1)
        table.append({"episode_index": e, "view": 0, "start": e * length, "length": length,
                      "split": "val" if e % val_every == val_every - 1 else "train", "has_actions": labelled,
                      "task": "move the blob", "augment": None})
    return write_episode_tokens(path, IDENTITY, source=source, patch_FPZ=np.stack(patch), action_FA=np.stack(action),
                                state_FS=np.stack(state), table=table, labelled=labelled)
