"""The ingest stage's config (`IngestConfig`, `ingest_config`): what decides a manifest's content, validated where
it is made. A module of its own, light to import: the command line reads its defaults before anything runs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from pipeline.names import safe_component, safe_relative
from pipeline.registry import SourceRef
from pipeline.stage import ShardSpec, UserError, to_jsonable

VIDEO_CHECKS = ("ends", "full", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """source: dataset name (registry name, or the root's folder name). cameras: empty = all videos.
    use_actions: False ingests as action-free even if an action feature exists. video_check: `ends`
    decodes each episode's first and last frame per camera, `full` every frame, `none` only checks files.
    """

    source: str
    root: Path
    repo_id: str
    out: Path
    cameras: tuple[str, ...] = ()
    use_actions: bool = True
    val_fraction: float = 0.1
    val_episodes: int = 0  # > 0: exactly this many whole episodes held out (the hash order's first), not a share
    split_seed: int = 0
    split_by: str = ""  # "" (each episode its own group) | a per-episode metadata column | task | task:REGEX
    tolerance_s: float = 1e-4
    video_check: str = "ends"
    block_size: int = 256
    shard: ShardSpec = ShardSpec()
    force: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.val_episodes < 0 or (self.val_episodes and self.split_by):
            raise UserError(f"--val-episodes {self.val_episodes}: must be >= 0, and holds out whole episodes (not "
                            "with --split-by, whose groups --val-fraction splits)")
        if self.video_check not in VIDEO_CHECKS:
            raise UserError(f"--video-check {self.video_check!r}: choose one of {VIDEO_CHECKS}")
        if self.tolerance_s <= 0 or self.block_size < 1:
            raise UserError("--tolerance-s must be > 0 and block_size >= 1")
        if self.split_by.startswith("task:"):
            try:
                re.compile(self.split_by[5:])
            except re.error as e:
                raise UserError(f"--split-by {self.split_by!r}: not a regular expression ({e}); e.g. "
                                "'task:scene (\\d+)'") from None
        # names that later stages join to paths (the store's sources/<source>, the camera folders of a dataset)
        safe_component(self.source, f"source name of {self.root}", "Rename the dataset folder, or register it "
                       "under a safe name (registry/<name>.toml with root = ...) and ingest --dataset <name>.")
        safe_relative(self.repo_id, "repo id", "Give --repo-id org/name.", max_parts=2)
        for cam in self.cameras:
            safe_component(cam, "camera key", "Name the cameras as the dataset's meta/info.json does.")

    def identity(self) -> dict[str, Any]:
        """The fields that decide the manifest's content (not where it goes or how work is split)."""
        keys = ("source", "repo_id", "cameras", "use_actions", "val_fraction", "split_seed", "tolerance_s",
                "video_check")
        d = {k: to_jsonable(getattr(self, k)) for k in keys}
        if self.split_by:  # absent when unset, so manifests made before group splits stay up to date
            d["split_by"] = self.split_by
        if self.val_episodes:  # likewise
            d["val_episodes"] = self.val_episodes
            del d["val_fraction"]
        d["root"] = str(Path(self.root).resolve())
        return d


def ingest_config(src: SourceRef, *, out: Path | None = None, cameras: tuple[str, ...] = (),
                  no_actions: bool = False, val_fraction: float | None = None, split_by: str | None = None,
                  **fields: Any) -> IngestConfig:
    """The ingest config of a source: flags given win, then its registry entry, then the config's defaults."""
    spec = src.spec
    return IngestConfig(
        source=src.name, root=src.root, repo_id=src.repo_id, out=out or Path("manifests") / f"{src.name}.parquet",
        cameras=cameras or (spec.cameras if spec else ()),
        use_actions=not no_actions and (spec.use_actions if spec else True),
        val_fraction=val_fraction if val_fraction is not None else (spec.val_fraction if spec else
                                                                    IngestConfig.val_fraction),
        split_by=split_by if split_by is not None else (spec.split_by if spec else ""),
        **fields)
