"""Where `wmctl encode` writes: the token store opened, or with --force replaced when it was made with another
encoder, layout or schema (`_open_store`), and the free disk space checked against the projected size first
(`check_space`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.encode_plan import EncodeConfig, SegmentPlan, SourceInfo
from featurestore.encoders import HFDinoEncoder
from featurestore.store import STORE_KEY, StoreLayout, TokenStore, projected_bytes
from pipeline.stage import NoSpaceError, UserError

log = logging.getLogger("featurestore.encode")  # the stage's logger, as before this part had a module of its own


def _open_store(cfg: EncodeConfig, encoder: HFDinoEncoder) -> TokenStore:
    """Open or create the store; with --force, delete and recreate a wmctl token store made with another encoder,
    layout or schema (never a folder or Zarr group that is not a token store: refused, named)."""
    import shutil

    recorded = TokenStore.recorded_encoder(cfg.store)  # an existing store's: its hash of these weights is kept
    try:
        return TokenStore.create_or_open(cfg.store, encoder.identity(recorded), cfg.layout, encoder.location)
    except UserError as e:
        if not cfg.force:
            raise
        attrs = token_store_attrs(cfg.store)
        if attrs is None:
            raise UserError(f"{cfg.store} is not a wmctl token store (no {STORE_KEY} attribute in its zarr.json): "
                            "--force replaces only token stores wmctl wrote; choose another --store") from None
        log.warning("--force: deleting token store %s (%s)", cfg.store,
                    replace_reason(attrs, encoder.identity(recorded), cfg.layout) or e)
        shutil.rmtree(cfg.store)
    return TokenStore.create_or_open(cfg.store, encoder.identity(), cfg.layout, encoder.location)


def token_store_attrs(path: Path) -> dict[str, Any] | None:
    """The root attributes of the wmctl token store at `path` (`STORE_KEY`); None when it is not one (no zarr.json,
    another Zarr group, a link)."""
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes") if meta.is_file() and not Path(path).is_symlink() \
            else None
    except (OSError, ValueError, AttributeError):
        return None
    found = attrs.get(STORE_KEY) if isinstance(attrs, dict) else None
    return found if isinstance(found, dict) else None


def replace_reason(attrs: dict[str, Any], encoder: dict[str, Any], layout: StoreLayout) -> str:
    """Why a store with root attributes `attrs` is not the one wanted, in words: another schema, or made with
    another encoder (by identity, the weights, not their name) and/or layout, with the fields that differ."""
    from featurestore.encoders import identity_key
    from featurestore.store import SCHEMA_VERSION
    from pipeline.stage import config_differences

    if attrs.get("schema_version") != SCHEMA_VERSION:
        return f"store schema {attrs.get('schema_version')}, this wmctl writes {SCHEMA_VERSION}"
    have = identity_key(attrs.get("encoder") or {})
    want = json.loads(json.dumps(identity_key(encoder)))
    parts = {"encoder": config_differences(have, want, prefix="encoder."),
             "layout": config_differences(attrs.get("layout") or {}, dataclasses.asdict(layout), prefix="layout.")}
    kinds = [k for k, d in parts.items() if d]
    if not kinds:
        return ""
    return f"made with another {' and '.join(kinds)}: {'; '.join(parts['encoder'] + parts['layout'])}"


def check_space(cfg: EncodeConfig, src: SourceInfo, every_shard: list[SegmentPlan], schema: dict[str, Any]) -> None:
    """Refuse an encode whose projected size (`projected_bytes`, uncompressed, of every shard's pending frames: the
    shards share the store's disk) exceeds the free space of the store's file system, unless `force_space`. The
    refusal names the size, the free space and the rates and dtypes that would fit."""
    lengths = np.array([int(e["length"]) for p in every_shard for e in p.episodes], dtype=np.int64)

    def frames_at(stride: int) -> int:  # frames stored of every pending episode at that stride
        return int((-(-lengths // stride)).sum())

    need = projected_bytes(frames_at(src.stride), **schema)
    probe = Path(cfg.store).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need <= free:
        return
    what = (f"{cfg.store}: the encode of {src.name} projects {_size(need)} ({frames_at(src.stride):,} frames at "
            f"{schema['dtype']}, uncompressed, all shards) but {probe}'s file system has {_size(free)} free")
    if cfg.force_space:
        log.warning("%s; --force-space: encoding anyway", what)
        return
    fits = []
    for dtype in dict.fromkeys((schema["dtype"], "int8")):
        for k in range(src.stride, max(src.stride, int(src.fps)) + 1):  # down to about 1 frame per second
            size = projected_bytes(frames_at(k), **{**schema, "dtype": dtype})
            if size <= free:
                fits.append(f"--fps {src.fps / k:g}{' --dtype int8' if dtype == 'int8' else ''} ({_size(size)})")
                break
    hint = f"it fits at {' or '.join(fits)}" if fits else "no rate or dtype fits"
    if any("int8" in f for f in fits):
        hint += " (a store's dtype is set when it is made: int8 needs a new --store)"
    raise NoSpaceError(f"{what}: no space left on the device for it; {hint}; or free space (or choose a store on a "
                       "disk with room), or pass --force-space")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return ""
