"""Reading LeRobot v3.0 datasets: metadata through lerobot, low-dim columns through pyarrow.

`open_meta` checks what lerobot would otherwise turn into a Hub download or an opaque traceback (a path
that is not a dataset, a v2.x layout) and then loads the metadata with `LeRobotDatasetMetadata`, offline
when the root is local.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.lerobot_compat import offline_env
from pipeline.names import safe_relative
from pipeline.stage import UserError, file_sha256

SUPPORTED_VERSION = "v3.0"
CONVERT_CMD = (
    "python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 --repo-id={name} --root={parent} --push-to-hub=false"
)


@dataclasses.dataclass
class DatasetMeta:
    """What ingest needs from a LeRobot v3.0 dataset's `meta/`."""

    root: Path
    repo_id: str
    info: dict[str, Any]
    info_sha256: str
    episodes: pd.DataFrame  # one row per episode: lerobot's meta/episodes columns (stats dropped)
    tasks: dict[int, str]
    _confined: set[str] = dataclasses.field(default_factory=set, repr=False, compare=False)  # paths checked

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def version(self) -> str:
        return str(self.info.get("codebase_version"))

    @property
    def features(self) -> dict[str, dict]:
        return self.info["features"]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    def feature_dim(self, key: str) -> int | None:
        if key not in self.features:
            return None
        return int(np.prod(self.features[key]["shape"]))

    def video_path(self, row: pd.Series, key: str) -> Path:
        return self._file("video_path", video_key=key, chunk_index=int(row[f"videos/{key}/chunk_index"]),
                          file_index=int(row[f"videos/{key}/file_index"]))

    def data_path(self, chunk_index: int, file_index: int) -> Path:
        return self._file("data_path", chunk_index=chunk_index, file_index=file_index)

    def _file(self, template: str, **fields: Any) -> Path:
        """`root / info[template].format(**fields)`, refused unless it is a relative path of safe names (no `..`, not
        absolute), so that meta/info.json cannot point a stage at files outside the dataset. Links the dataset's owner
        put inside it (a `videos/` on another disk, a Hugging Face cache snapshot's links into its blobs) are
        followed: they are the dataset's, not the metadata's."""
        where = f"{template} of {self.root / 'meta' / 'info.json'}"
        try:
            rel = str(self.info[template]).format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"{where}: not a LeRobot path template ({e!r}); the dataset metadata is damaged") from None
        if rel not in self._confined:
            fix = "the dataset metadata is damaged or was edited: re-download or re-convert it"
            safe_relative(rel, where, fix)
            self._confined.add(rel)
        return self.root / rel


def check_dataset_root(root: Path) -> dict[str, Any]:
    """Raise a UserError naming the fix unless `root` is a LeRobot v3.0 dataset. Returns info.json."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such directory (give the dataset root, the folder holding meta/ and data/)")
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        nested = sorted(p.parent.parent for p in root.glob("*/meta/info.json"))[:3]
        hint = f" Did you mean {', '.join(map(str, nested))}?" if nested else ""
        raise UserError(
            f"{root} is not a LeRobot dataset: {info_path} is missing "
            f"(a dataset root holds meta/info.json, data/ and videos/).{hint}"
        )
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{info_path}: not valid JSON ({e}); the dataset metadata is damaged") from None
    version = str(info.get("codebase_version", "unknown"))
    if version.startswith("v2"):
        raise UserError(
            f"{root} is a LeRobot {version} dataset; wmctl reads v3.0. Convert it once (the original is kept "
            f"as {root.name}_old): " + CONVERT_CMD.format(name=root.name, parent=root.parent.resolve())
        )
    if version != SUPPORTED_VERSION:
        raise UserError(f"{root}: LeRobot codebase_version {version!r} is not supported (wmctl reads v3.0)")
    for rel in ("meta/tasks.parquet",):
        if not (root / rel).is_file():
            raise UserError(f"{root}: {rel} is missing; the dataset is incomplete (re-download or re-convert it)")
    if not any((root / "meta" / "episodes").glob("*/*.parquet")):
        raise UserError(f"{root}: meta/episodes/*/*.parquet is missing; the dataset is incomplete")
    return info


def open_meta(root: Path, repo_id: str) -> DatasetMeta:
    root = Path(root)
    info = check_dataset_root(root)  # info.json as a plain dict (lerobot 0.6 wraps it in a DatasetInfo object)
    offline_env()
    from pipeline.lerobot_compat import dataset_classes

    meta = dataset_classes()[1](repo_id, root=root)
    episodes = meta.episodes.to_pandas().sort_values("episode_index").reset_index(drop=True)
    tasks_df = meta.tasks
    if "task" in tasks_df.columns:
        tasks = dict(zip(tasks_df["task_index"].astype(int), tasks_df["task"]))
    else:
        tasks = {int(i): str(t) for t, i in zip(tasks_df.index, tasks_df["task_index"])}
    return DatasetMeta(
        root=root,
        repo_id=repo_id,
        info=info,
        info_sha256=file_sha256(root / "meta" / "info.json"),
        episodes=episodes,
        tasks=tasks,
    )


class DataFileCache:
    """Per-episode low-dim columns from LeRobot data parquet files, keeping the last few files loaded."""

    def __init__(self, columns: list[str], max_files: int = 2):
        self.columns, self.max_files = columns, max_files
        self._tables: OrderedDict[Path, pd.DataFrame] = OrderedDict()

    def _load(self, path: Path) -> pd.DataFrame:
        if path in self._tables:
            self._tables.move_to_end(path)
            return self._tables[path]
        schema = pq.read_schema(path)
        cols = [c for c in ["episode_index", "frame_index", "timestamp", *self.columns] if c in schema.names]
        table = pq.read_table(path, columns=cols).to_pandas()
        self._tables[path] = table
        while len(self._tables) > self.max_files:
            self._tables.popitem(last=False)
        return table

    def rows_in_file(self, path: Path, episode: int) -> pd.DataFrame:
        """The rows of `episode` in data file `path`, ordered by frame_index (empty if none)."""
        table = self._load(Path(path))
        rows = table[table["episode_index"] == episode]
        return rows.sort_values("frame_index") if "frame_index" in rows else rows

    def episode_rows(self, meta: DatasetMeta, row: pd.Series) -> tuple[Path, pd.DataFrame]:
        """Find an episode's rows from its meta/episodes row. Datasets converted with lerobot <= 0.4.4 can
        point a boundary episode at the previous data file, so the next file is tried too."""
        ep = int(row["episode_index"])
        chunk, file = int(row["data/chunk_index"]), int(row["data/file_index"])
        first = meta.data_path(chunk, file)
        if not first.exists():
            raise FileNotFoundError(f"data file {first} is missing")
        for c, f in [(chunk, file), (chunk, file + 1), (chunk + 1, 0)]:
            path = meta.data_path(c, f)
            if path.exists() and len(rows := self.rows_in_file(path, ep)):
                return path, rows
        return first, self.rows_in_file(first, ep)


def stack_column(rows: pd.DataFrame, key: str) -> np.ndarray:
    """A fixed-size-list (or scalar) parquet column as a float array [frames, dim]."""
    values = rows[key].to_numpy()
    if len(values) and isinstance(values[0], (list, tuple, np.ndarray)):
        return np.stack([np.asarray(v, dtype=np.float64) for v in values])
    return values.astype(np.float64)[:, None]
