"""The Zarr v3 token store: its folders and committed-segment listing (the format, `featurestore.store_format`; the
segment writer, `featurestore.segment_writer`).

```
tokens.zarr/                          root group; attrs["wmctl_token_store"]: schema, encoder identity, layout
  sources/<source>/                   attrs["wmctl_source"]: provenance (repo id, root, fps, info.json hash, ...)
    segments/<segment id>/            a COMMITTED group of whole episodes, written by one task
      patch        [F, C, P, D]  float16 (or int8 + patch_scale [F, C, P] float16, per-token absmax / 127)
      cls          [F, C, D]     float16
      action       [F, A]        float32, NaN where there is no action (never zeros that look real)
      action_valid [F]           bool
      state        [F, S]        float32 (NaN when the dataset has no observation.state)
      timestamp    [F]           float64 (seconds within the episode, from the dataset)
      episode_index, frame_index [F]
      attrs["wmctl_segment"]: the episode table (start, length, split, has_actions, task, view, ...)
    staging/<segment id>.<host.pid.tag>/   in progress; readers ignore it; renamed into segments/ to commit
    failed/<e{episode}-v{view}>/      a group whose attrs say why that episode could not be encoded
```

Why segments: a Zarr shard is rewritten whole, so two writers touching one shard lose data without an
error (zarr-python #3682, #3514). A segment is written by exactly one task into a private staging group
and committed with one directory rename; committed segments are never rewritten, and appending episodes
adds segments. Within a segment each array shard (the write unit) is written once, whole.
F = frames, C = cameras, P = patch tokens per camera, D = encoder width, A/S = action/state width.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import zarr

from featurestore.segment_writer import SegmentWriter
from featurestore.store_format import (  # noqa: F401 - projected_bytes, token_compression: re-exported
    FAILED_KEY,
    SCHEMA_VERSION,
    SEGMENT_KEY,
    SOURCE_KEY,
    STORE_DESCRIPTION,
    STORE_KEY,
    DamagedStoreError,
    StoreLayout,
    check_segment_attrs,
    projected_bytes,
    read_node_meta,
    token_compression,
)
from pipeline.stage import ConfigMismatchError, UserError, config_differences, fault_point, is_stale

log = logging.getLogger(__name__)


class TokenStore:
    """A token store directory. Open with `create_or_open` (writers) or `open_existing` (readers)."""

    def __init__(self, path: Path, attrs: dict[str, Any]):
        self.path = Path(path)
        self.attrs = attrs

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_existing(cls, path: Path) -> TokenStore:
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise UserError(f"{path} is not a token store (no zarr.json); create it with `wmctl encode`")
        try:
            raw = json.loads((path / "zarr.json").read_bytes())
            is_group = isinstance(raw, dict) and raw.get("node_type") == "group"
        except ValueError:  # not JSON, not UTF-8
            is_group = False
        if is_group and isinstance(raw.get("attributes", {}), dict) and STORE_KEY not in raw.get("attributes", {}):
            raise UserError(f"{path} is a Zarr group but not a wmctl token store (no {STORE_KEY} attribute)")
        try:
            attrs = read_node_meta(path / "zarr.json", STORE_KEY)
            for k, t in (("encoder", dict), ("layout", dict)):
                if not isinstance(attrs.get(k), t):
                    raise ValueError(f"{STORE_KEY}.{k} is {type(attrs.get(k)).__name__}, not a table")
            StoreLayout(**attrs["layout"])
        except (ValueError, TypeError, UserError) as e:
            raise UserError(f"{path / 'zarr.json'} is damaged ({e}): the token store's root metadata (encoder, "
                            "layout) cannot be read. Restore that file from a copy of the store (another shard's "
                            "node, a backup), or re-encode into a new --store") from None
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: store schema {attrs.get('schema_version')} is not {SCHEMA_VERSION}; "
                            "re-encode into a new store")
        return cls(path, attrs)

    @classmethod
    def recorded_encoder(cls, path: Path) -> dict[str, Any] | None:
        """The encoder identity a store at `path` was made with; None where there is no readable store yet."""
        try:
            return cls.open_existing(path).attrs["encoder"] if (Path(path) / "zarr.json").is_file() else None
        except UserError:
            return None  # create_or_open says what is wrong with it

    @classmethod
    def create_or_open(cls, path: Path, encoder: dict[str, Any], layout: StoreLayout,
                       encoder_location: str | None = None) -> TokenStore:
        """Open a store made with the same encoder (`identity_key`: the weights, not their name or folder) and
        layout, or create it. Refuses others. `encoder_location`: where the encoder was loaded from, recorded at
        creation as a hint for later stages that need the encoder again (never compared)."""
        from featurestore.encoders import identity_key

        path = Path(path)
        wanted = {"encoder": encoder, "layout": dataclasses.asdict(layout)}
        check_store_path(path)
        if (path / "zarr.json").is_file():
            store = cls.open_existing(path)
            have = {"encoder": identity_key(store.attrs["encoder"]), "layout": store.attrs["layout"]}
            want = json.loads(json.dumps({**wanted, "encoder": identity_key(encoder)}))
            if have != want:
                raise ConfigMismatchError(f"token store {path}", config_differences(have, want),
                                          "Encode into another --store, or pass --force to delete and rebuild it.")
            if not (path / "sources" / "zarr.json").is_file():  # a creator killed between the two writes
                _make_group(path / "sources")
            return store
        attrs = {"schema_version": SCHEMA_VERSION, "description": STORE_DESCRIPTION, **wanted,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 **({"encoder_location": encoder_location} if encoder_location else {})}
        # several shards may create the store at once: identical content, atomic per-key writes
        if not _make_group(path, {STORE_KEY: attrs}):  # another writer created it first: theirs must match
            for _ in range(100):  # its zarr.json is being written
                if (path / "zarr.json").is_file():
                    return cls.create_or_open(path, encoder, layout, encoder_location)
                time.sleep(0.05)
            raise UserError(f"{path}: another process is creating this store and has not finished; try again")
        fault_point("store-root")
        _make_group(path / "sources")
        return cls.open_existing(path)

    @property
    def encoder(self) -> dict[str, Any]:
        return self.attrs["encoder"]

    @property
    def encoder_location(self) -> str | None:
        """Where the encoder was loaded from when the store was made (a hint; older stores recorded it as the
        identity's model_id)."""
        old = str(self.encoder.get("model_id", ""))
        return self.attrs.get("encoder_location") or (old if old.startswith("/") else None)

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(**self.attrs["layout"])

    # ------------------------------------------------------------------ sources
    def source_dir(self, source: str) -> Path:
        return self.path / "sources" / source

    def sources(self) -> list[str]:
        d = self.path / "sources"
        return sorted(p.name for p in d.iterdir() if (p / "zarr.json").is_file()) if d.is_dir() else []

    def source_attrs(self, source: str) -> dict[str, Any]:
        file = self.source_dir(source) / "zarr.json"
        try:
            return read_node_meta(file, SOURCE_KEY, required=False)
        except ValueError as e:
            raise UserError(f"{file} is damaged ({e}): source {source}'s provenance cannot be read. Re-encode the "
                            f"source with `wmctl encode --store {self.path} --manifest <its manifest> --force`, or "
                            "restore that file from a copy of the store") from None
        except FileNotFoundError:
            raise UserError(f"{self.path}: no source {source!r} (it has {self.sources()})") from None

    def ensure_source(self, source: str, provenance: dict[str, Any], *, fixed_keys: tuple[str, ...]) -> None:
        """Create the source group, or check that `fixed_keys` of its provenance did not change (and record the
        rest, e.g. a newer manifest). Safe against another writer creating the same source at the same time."""
        d = self.source_dir(source)
        if not (d / "zarr.json").is_file() and _make_group(d, {SOURCE_KEY: provenance}):
            fault_point("source-group")
            self._ensure_subgroups(d)
            return
        have = self.source_attrs(source)  # made earlier, or by another writer just now
        old = {k: have.get(k) for k in fixed_keys}
        new = json.loads(json.dumps({k: provenance.get(k) for k in fixed_keys}))
        if old != new:
            raise ConfigMismatchError(f"source {source!r} in {self.path}", config_differences(old, new),
                                      "Encode it under another source name or --store, or --force.")
        if have != json.loads(json.dumps(provenance)):
            zarr.open_group(d, mode="r+").attrs[SOURCE_KEY] = provenance
        self._ensure_subgroups(d)  # a creator killed after the source's zarr.json left them missing

    @staticmethod
    def _ensure_subgroups(d: Path) -> None:
        for sub in ("segments", "staging", "failed"):
            if not (d / sub / "zarr.json").is_file():
                _make_group(d / sub)

    # ------------------------------------------------------------------ segments
    def committed_segments(self, source: str, damaged: list[dict[str, Any]] | None = None
                           ) -> dict[str, dict[str, Any]]:
        """segment id -> its `wmctl_segment` attributes, for committed segments only. A segment whose zarr.json
        cannot be read raises DamagedStoreError naming the file, or, given a `damaged` list, is appended there
        ({"segment", "file", "problem"}) and left out."""
        d = self.source_dir(source) / "segments"
        out = {}
        if d.is_dir():
            for p in sorted(d.iterdir()):
                meta = p / "zarr.json"
                if not meta.is_file():
                    continue
                try:
                    out[p.name] = check_segment_attrs(read_node_meta(meta, SEGMENT_KEY))
                except ValueError as e:
                    if damaged is None:
                        raise DamagedStoreError(self.path, source, p.name, f"{meta}: {e}") from None
                    damaged.append({"segment": p.name, "file": str(meta), "problem": f"{meta}: {e}"})
        return out

    def failed(self, source: str) -> dict[str, dict[str, Any]]:
        d = self.source_dir(source) / "failed"
        out = {}
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if (p / "zarr.json").is_file():
                    try:
                        out[p.name] = read_node_meta(p / "zarr.json", FAILED_KEY)
                    except ValueError as e:  # a record of a failure only: the episode is tried again
                        log.warning("%s is damaged (%s): ignoring that failure record", p / "zarr.json", e)
        return out

    def record_failure(self, source: str, episode: int, view: int, reason: str) -> None:
        zarr.open_group(self.source_dir(source) / "failed" / f"e{episode:07d}-v{view}", mode="w",
                        attributes={FAILED_KEY: {"episode_index": episode, "view": view, "reason": reason,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})

    def clear_failures(self, source: str) -> None:
        shutil.rmtree(self.source_dir(source) / "failed", ignore_errors=True)
        _make_group(self.source_dir(source) / "failed")

    def staging_entries(self, source: str) -> list[tuple[Path, bool]]:
        """(staging group, stale) for each staging group of `source`: stale when its segment is committed or when
        `is_stale` says its writer is gone (a dead local process, or another host's untouched for hours)."""
        d = self.source_dir(source) / "staging"
        if not d.is_dir():
            return []
        segs = self.source_dir(source) / "segments"  # damaged or not, a committed segment's staging is debris
        committed = {p.name for p in segs.iterdir() if (p / "zarr.json").is_file()} if segs.is_dir() else set()
        out = []
        for p in sorted(d.iterdir()):
            if p.is_dir():
                seg_id, _, tag = p.name.partition(".")
                out.append((p, seg_id in committed or is_stale(tag, p)))
        return out

    def clean_stale_staging(self, source: str) -> int:
        """Remove the stale staging groups (`staging_entries`); live writers' groups stay."""
        n = 0
        for p, stale in self.staging_entries(source):
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    def begin_segment(self, source: str, seg_id: str, *, frames: int, cameras: int, tokens: int, dim: int,
                      action_dim: int, state_dim: int) -> SegmentWriter:
        return SegmentWriter(self, source, seg_id, frames=frames, cameras=cameras, tokens=tokens, dim=dim,
                             action_dim=action_dim, state_dim=state_dim)

    def disk_bytes(self, source: str | None = None, segment: str | None = None) -> int:
        """Bytes on disk of the store, one source, or one committed segment of it."""
        base = self.source_dir(source) if source else self.path
        if segment is not None:
            base = base / "segments" / segment
        return sum(f.stat().st_size for f in base.rglob("*") if f.is_file())


def check_store_path(path: Path) -> None:
    """A UserError saying what `path` is when it cannot be a store folder: a file, a symlink loop, a link to nothing,
    or a path through a file; nothing when it is a folder or does not exist yet."""
    path = Path(path)
    fix = "choose another --store path (a folder, or a name that does not exist yet)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(f"--store {path} is a symbolic link to {os.readlink(path)}, which does not exist: create "
                            f"that folder, remove the link, or {fix}") from None
        return
    except NotADirectoryError:
        raise UserError(f"--store {path}: a part of this path is a file where a folder is expected: {fix}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"--store {path} leads through a symbolic link loop (a link that leads back to itself): "
                            f"remove or fix the link, or {fix}") from None
        raise
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"--store {path} is a file ({st.st_size} bytes), not a token store folder: {fix}")


def _make_group(path: Path, attributes: dict[str, Any] | None = None) -> bool:
    """Create a group (with `attributes`), or find it created: False when another process made it first (two
    shards or a duplicated Dask task creating the same store or source at once), True when this call wrote it
    or it already existed without attributes to set."""
    if (Path(path) / "zarr.json").is_file():
        return attributes is None
    try:
        zarr.open_group(path, mode="a", attributes=attributes)
        return True
    except (zarr.errors.ContainsGroupError, FileExistsError):
        return False


