"""The one place that knows which LeRobot is installed: 0.6 (Python >= 3.12, the current stack) or 0.4.4 (3.11).

Only LeRobot's public dataset API is used (`LeRobotDataset`, `LeRobotDatasetMetadata`); the on-disk format is v3.0
on both. What differs, and is handled here:
- `LeRobotDataset.create`: 0.4 takes `vcodec=`; 0.5+ takes an `RGBEncoderConfig` (`rgb_encoder=`) and the file
  size limits as arguments.
- Where a dataset without an explicit root lives: 0.4 keeps it in `$HF_LEROBOT_HOME/<repo_id>`; 0.5+ looks there
  for local datasets but downloads from the Hub into a revision-safe Hugging Face cache under
  `$HF_LEROBOT_HOME/hub` (`datasets--<org>--<name>/snapshots/<commit>/`, found offline through `refs/`).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

from packaging.version import Version

LEROBOT_VERSION = Version(importlib.metadata.version("lerobot"))
HUB_LAYOUT = LEROBOT_VERSION >= Version("0.5")  # downloads in the Hugging Face cache layout under $HF_LEROBOT_HOME/hub
DATASET_REVISION = "v3.0"  # the codebase version LeRobot asks the Hub for (a tag), then `main`


def require_robot_stack(command: str) -> None:
    """Refuse `command` (the policy, the async-inference server) on lerobot < 0.6, which has neither the policy
    registry nor the async-inference protocol they are built on: one line naming the fix."""
    if LEROBOT_VERSION < Version("0.6"):
        from pipeline.stage import UserError

        raise UserError(f"{command} needs lerobot >= 0.6 (the Python 3.12 stack; `make install`); this environment "
                        f"has lerobot {LEROBOT_VERSION}")


def offline_env() -> None:
    """Make any accidental Hub call fail fast instead of hanging (set before lerobot/HF are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def dataset_classes() -> tuple[type, type]:
    """(LeRobotDataset, LeRobotDatasetMetadata) from the installed lerobot's public module."""
    try:
        from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata  # 0.5+: re-exported by the package
    except ImportError:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    return LeRobotDataset, LeRobotDatasetMetadata


def lerobot_home() -> Path:
    """`$HF_LEROBOT_HOME` as the installed lerobot resolves it, read now (tests and jobs may set it late)."""
    if os.environ.get("HF_LEROBOT_HOME"):
        return Path(os.environ["HF_LEROBOT_HOME"]).expanduser()
    from lerobot.utils.constants import HF_LEROBOT_HOME

    return Path(HF_LEROBOT_HOME)


def default_root(repo_id: str) -> Path:
    """Where the installed lerobot keeps dataset `repo_id` when no root is given: `$HF_LEROBOT_HOME/<repo_id>`
    if it exists (both versions), else with lerobot 0.5+ the snapshot it downloaded into its Hub cache (found
    without network). Falls back to `$HF_LEROBOT_HOME/<repo_id>`, which the caller's check then reports."""
    local = lerobot_home() / repo_id
    if local.is_dir() or not HUB_LAYOUT:
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for revision in (DATASET_REVISION, "main"):
        try:
            return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                          cache_dir=lerobot_home() / "hub", local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            continue
    return local


def where_to_look(repo_id: str) -> str:
    """The places `default_root` searches, for an error message."""
    home = lerobot_home()
    if not HUB_LAYOUT:
        return str(home / repo_id)
    cache = home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    return f"{home / repo_id} or the Hub cache {cache}/snapshots/"


def create_dataset(*, repo_id: str, fps: int, features: dict[str, Any], root: Path, robot_type: str | None,
                   vcodec: str, data_files_size_in_mb: float | None = None,
                   video_files_size_in_mb: float | None = None, chunks_size: int | None = None):
    """A new LeRobot dataset written by lerobot itself (PyAV video backend, `vcodec`), with optional file-size and
    chunk limits (tiny limits make the multi-file layout of a large dataset)."""
    LeRobotDataset, _ = dataset_classes()
    if HUB_LAYOUT:
        from lerobot.configs.video import RGBEncoderConfig

        codec = {"rgb_encoder": RGBEncoderConfig(vcodec=vcodec, video_backend="pyav")}
    else:
        codec = {"vcodec": vcodec}
    ds = LeRobotDataset.create(repo_id=repo_id, fps=fps, features=features, root=root, robot_type=robot_type,
                               use_videos=True, video_backend="pyav", **codec)
    ds.meta.update_chunk_settings(chunks_size=chunks_size, data_files_size_in_mb=data_files_size_in_mb,
                                  video_files_size_in_mb=video_files_size_in_mb)
    return ds
