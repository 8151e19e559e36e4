"""`wmctl status`: what a token store holds, per source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featurestore.store import TokenStore


def store_status(path: Path) -> dict[str, Any]:
    store = TokenStore.open_existing(path)
    sources = []
    for source in store.sources():
        attrs = store.source_attrs(source)
        segs = store.committed_segments(source)
        committed = {(e["episode_index"], e["view"]) for s in segs.values() for e in s["episodes"]}
        failed = {(f["episode_index"], f["view"]) for f in store.failed(source).values()}
        views = 1 + attrs.get("augment", {}).get("views", 0)
        pending: int | str = "?"
        manifest = Path(attrs.get("manifest", ""))
        if manifest.is_file():
            from pipeline.ingest import read_manifest

            df, _ = read_manifest(manifest)
            ok = set(df[df.status == "ok"].episode_index.astype(int))
            pending = sum(1 for e in ok for v in range(views) if (e, v) not in committed | failed)
        staging = store.source_dir(source) / "staging"
        sources.append({
            "source": source,
            "segments": len(segs),
            "episodes_committed": len(committed),
            "episodes_failed": len(failed),
            "episodes_pending": pending,
            "frames": sum(s["frames"] for s in segs.values()),
            "bytes": store.disk_bytes(source),
            "in_progress": sum(1 for p in staging.iterdir() if p.is_dir()) if staging.is_dir() else 0,
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
    table = Table("source", "committed", "failed", "pending", "in progress", "segments", "frames", "GB on disk",
                  "cameras", "actions", title=title)
    for s in info["sources"]:
        table.add_row(s["source"], str(s["episodes_committed"]), str(s["episodes_failed"]),
                      str(s["episodes_pending"]), str(s["in_progress"]), str(s["segments"]), str(s["frames"]),
                      f"{s['bytes'] / 1e9:.3f}", str(len(s["cameras"] or [])), "yes" if s["has_actions"] else "no")
    return table
