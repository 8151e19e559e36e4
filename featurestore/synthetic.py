"""A token store of random tokens at real shapes, written through the store's own writer: for benchmarks of
training throughput and data loading where no encoder or video is at hand (e.g. a bare GPU machine).
The tokens carry no signal; the identity says so (`random_weights`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore.store import StoreLayout, TokenStore


def write_random_store(path: Path, *, cameras: int, grid: tuple[int, int], dim: int, episodes: int, frames: int,
                       action_dim: int = 7, state_dim: int = 7, seed: int = 0, source: str = "synthetic",
                       layout: StoreLayout | None = None) -> Path:
    """`episodes` labelled episodes of `frames` frames (every 5th episode held out) as one committed segment."""
    layout = layout or StoreLayout(episodes_per_segment=max(episodes, 1))
    identity = {"model_id": f"synthetic-{cameras}x{grid[0]}x{grid[1]}x{dim}", "weights_sha256": "0" * 64,
                "random_weights": True, "grid": list(grid), "dim": dim, "patch_size": 16, "num_register_tokens": 0,
                "preprocess": {"height": grid[0] * 16, "width": grid[1] * 16, "resize": "crop"}}
    store = TokenStore.create_or_open(path, identity, layout)
    cam_keys = [f"observation.images.cam{i}" for i in range(cameras)]
    store.ensure_source(source, {"source": source, "cameras": cam_keys, "action_dim": action_dim,
                                 "state_dim": state_dim, "has_actions": True, "fps": 15.0}, fixed_keys=())
    rng = np.random.default_rng(seed)
    F, P = episodes * frames, grid[0] * grid[1]
    writer = store.begin_segment(source, "v0-b000000", frames=F, cameras=cameras, tokens=P, dim=dim,
                                 action_dim=action_dim, state_dim=state_dim)
    step = layout.shard_frames
    for s in range(0, F, step):
        n = min(step, F - s)
        writer.add(s, rng.standard_normal((n, cameras, P, dim), dtype=np.float32).astype(np.float16),
                   np.zeros((n, cameras, dim), np.float16))
    table = [{"episode_index": e, "view": 0, "start": e * frames, "length": frames,
              "split": "val" if e % 5 == 4 else "train", "has_actions": True, "task": "", "augment": None}
             for e in range(episodes)]
    writer.commit(action=rng.standard_normal((F, action_dim)), action_valid=np.ones(F, bool),
                  state=np.cumsum(rng.standard_normal((F, state_dim)) * 0.05, axis=0),
                  timestamp=np.tile(np.arange(frames) / 15.0, episodes),
                  episode_index=np.repeat(np.arange(episodes), frames),
                  frame_index=np.tile(np.arange(frames), episodes),
                  attrs={"source": source, "segment_id": "v0-b000000", "view": 0, "block": 0, "frames": F,
                         "cameras": cam_keys, "episodes": table})
    return Path(path)


def write_episode_tokens(path: Path, identity: dict, *, source: str, patch_FPZ: np.ndarray, action_FA: np.ndarray,
                         state_FS: np.ndarray, table: list[dict], labelled: bool = True, fps: float = 10.0,
                         camera: str = "observation.image") -> Path:
    """Tokens made directly (one camera, `patch` [F, P, Z]) with their actions and states, episodes back to back as
    `table` lists them, written as one committed segment of `source` through the store's own writer. Unlabelled:
    NaN actions, marked invalid."""
    F, P, Z = patch_FPZ.shape
    A, S = action_FA.shape[1], state_FS.shape[1]
    lengths = [int(row["length"]) for row in table]
    store = TokenStore.create_or_open(path, identity, StoreLayout(episodes_per_segment=len(table)))
    store.ensure_source(source, {"source": source, "cameras": [camera], "action_dim": A, "state_dim": S,
                                 "has_actions": labelled, "fps": fps}, fixed_keys=())
    writer = store.begin_segment(source, "v0-b000000", frames=F, cameras=1, tokens=P, dim=Z, action_dim=A,
                                 state_dim=S)
    writer.add(0, patch_FPZ[:, None].astype(np.float16), np.zeros((F, 1, Z), np.float16))
    writer.commit(action=action_FA if labelled else np.full((F, A), np.nan), action_valid=np.full(F, labelled),
                  state=state_FS, timestamp=np.concatenate([np.arange(n) / fps for n in lengths]),
                  episode_index=np.repeat(np.arange(len(table)), lengths),
                  frame_index=np.concatenate([np.arange(n) for n in lengths]),
                  attrs={"source": source, "segment_id": "v0-b000000", "view": 0, "block": 0, "frames": F,
                         "cameras": [camera], "episodes": table})
    return Path(path)
