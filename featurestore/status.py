"""`wmctl status`: what a token store holds, per source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from featurestore.store import TokenStore

TOKEN_ARRAYS = ("patch", "cls", "patch_scale")  # NaN there is a missing chunk (never a real value)


def store_status(path: Path) -> dict[str, Any]:
    store = TokenStore.open_existing(path)
    sources = []
    for source in store.sources():
        attrs = store.source_attrs(source)
        damaged: list[dict[str, Any]] = []
        segs = store.committed_segments(source, damaged=damaged)
        committed = {(e["episode_index"], e["view"]) for s in segs.values() for e in s["episodes"]}
        failed = {(f["episode_index"], f["view"]) for f in store.failed(source).values()}
        views = 1 + attrs.get("augment", {}).get("views", 0)
        pending: int | str = "?"
        split = "?"
        manifest = Path(attrs.get("manifest", ""))
        if manifest.is_file():
            from pipeline.manifest import read_manifest, split_summary

            df, _ = read_manifest(manifest)
            split = split_summary(manifest)
            ok = set(df[df.status == "ok"].episode_index.astype(int))
            pending = sum(1 for e in ok for v in range(views) if (e, v) not in committed | failed)
        staging = store.staging_entries(source)
        sources.append({
            "source": source,
            "segments": len(segs),
            "episodes_committed": len(committed),
            "episodes_failed": len(failed),
            "episodes_pending": pending,
            "frames": sum(s["frames"] for s in segs.values()),
            "bytes": store.disk_bytes(source),
            "in_progress": sum(1 for _, stale in staging if not stale),
            "stale": sum(1 for _, stale in staging if stale),  # removed by the next encode of this source
            "damaged_metadata": damaged,  # segments whose zarr.json cannot be read (`encode --repair` rewrites them)
            "split": split,
            "cameras": attrs.get("cameras"),
            "has_actions": attrs.get("has_actions"),
        })
    return {"store": str(path), "encoder": store.encoder, "layout": store.attrs["layout"], "sources": sources}


def status_table(info: dict[str, Any]):
    from rich.table import Table

    enc = info["encoder"]
    title = (f"{info['store']}  encoder {enc['model_id']} (sha256 {enc['weights_sha256'][:12]}"
             f"{', RANDOM weights' if enc.get('random_weights') else ''}), grid {enc['grid']}x{enc['dim']}, "
             f"{info['layout']['dtype']}")
    table = Table("source", "committed", "failed", "pending", "in progress", "stale", "segments", "frames",
                  "GB on disk", "cameras", "actions", title=title)
    for s in info["sources"]:
        table.add_row(s["source"], str(s["episodes_committed"]), str(s["episodes_failed"]),
                      str(s["episodes_pending"]), str(s["in_progress"]), str(s["stale"]), str(s["segments"]),
                      str(s["frames"]),
                      f"{s['bytes'] / 1e9:.3f}", str(len(s["cameras"] or [])), "yes" if s["has_actions"] else "no")
    bad = [f"{s['source']}/{d['segment']} ({d['problem']})" for s in info["sources"]
           for d in s.get("damaged_metadata", [])]
    if bad:  # left out of the counts above: say so, and how to fix it
        table.caption = (f"[red]damaged, not counted: {'; '.join(bad)}. `wmctl encode --store {info['store']} "
                         "--manifest <the source's manifest> --repair` re-encodes them[/red]")
    return table


def verify_segment(seg_dir: Path, frames: int, step: int = 256) -> str | None:
    """Read every chunk of a committed segment; the first problem found (a checksum that fails, a truncated or
    missing shard, a token array with missing chunks), or None when it reads back whole."""
    names = sorted(p.name for p in seg_dir.iterdir() if (p / "zarr.json").is_file()) if seg_dir.is_dir() else []
    for required in ("patch", "cls", "action", "action_valid", "state", "timestamp", "episode_index", "frame_index"):
        if required not in names:
            return f"array {required} is missing"
    for name in names:
        try:
            arr = zarr.open_array(seg_dir / name, mode="r")
            for s in range(0, max(frames, 1), step):
                block = arr[s:s + step]
                if name in TOKEN_ARRAYS and np.issubdtype(block.dtype, np.floating) and np.isnan(block).any():
                    return f"{name} has missing chunks at frames {s}-{min(frames, s + step)}"
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            return f"{name}: {type(e).__name__}: {e}"
    return None


def verify_store(path: Path, sources: list[str] | None = None) -> list[dict[str, Any]]:
    """Every committed segment read back in full: the damaged ones (source, segment, problem, episodes), those whose
    zarr.json (the episode table) cannot be read included, with the file named."""
    store = TokenStore.open_existing(path)
    damaged = []
    for source in sources or store.sources():
        bad_meta: list[dict[str, Any]] = []
        for seg_id, seg in store.committed_segments(source, damaged=bad_meta).items():
            problem = verify_segment(store.source_dir(source) / "segments" / seg_id, int(seg["frames"]))
            if problem:
                damaged.append({"source": source, "segment": seg_id, "problem": problem,
                                "episodes": [e["episode_index"] for e in seg["episodes"]]})
        for d in bad_meta:
            seg_dir = store.source_dir(source) / "segments" / d["segment"]
            damaged.append({"source": source, "segment": d["segment"], "problem": d["problem"], "file": d["file"],
                            "episodes": _episodes_in(seg_dir)})
    return damaged


def _episodes_in(seg_dir: Path) -> list[int]:
    """The episodes a segment holds, from its episode_index array (when its episode table is what is damaged)."""
    try:
        return sorted(int(e) for e in np.unique(zarr.open_array(seg_dir / "episode_index", mode="r")[...]))
    except Exception:  # noqa: BLE001 - best effort: damaged too
        return []
