"""`wmctl bench ...`: benchmarks (not tests), side-by-side ratios plus absolute numbers and the machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from featurestore.bench import bench_encode
from featurestore.encode import EncodeConfig
from featurestore.encoders import DEFAULT_ENCODER, Preprocess
from pipeline.bench import bench_decode
from pipeline.cli.base import console, hxw, new_app, print_result, split_list
from pipeline.machine import bench_device
from pipeline.manifest import manifest_path
from pipeline.registry import resolve_source
from pipeline.stage import UserError
from planner.bench import BenchCase, bench_plan
from planner.offline import search_configs
from trainer.api import LoadedWorldModel, inference_dtype
from trainer.bench import bench_rollout, bench_train

app = new_app("Benchmarks (not tests): side-by-side ratios plus absolute numbers and the machine.")

Device = Annotated[str, typer.Option(help="auto | cpu | cuda.")]


@app.command("decode")
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


@app.command("encode")
def bench_encode_cmd(
    dataset: Annotated[str | None, typer.Option(help="Registered dataset (manifests/<name>.parquet).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Manifest (instead of --dataset).")] = None,
    encoder: Annotated[str, typer.Option(help="Encoder dir or id.")] = "",
    image_size: Annotated[str, typer.Option(help="N or HxW.")] = str(Preprocess.height),
    batch_size: Annotated[int, typer.Option(help="Frames per batch.")] = EncodeConfig.batch_size,
    device: Device = EncodeConfig.device,
    episodes: Annotated[int | None, typer.Option(help="Only the first N ok episodes.")] = None,
) -> None:
    """Decode-only, encoder-only, write-only and pipelined frames/s on the same frames; bytes per frame."""
    manifest = manifest_path(dataset, manifest)
    h, w = hxw(image_size)
    cfg = EncodeConfig(manifest=manifest, store=Path("unused"), encoder=encoder or DEFAULT_ENCODER,
                       preprocess=Preprocess(height=h, width=w), batch_size=batch_size, device=device)
    print_result(f"encode: {manifest}", bench_encode(cfg, max_episodes=episodes))


@app.command("rollout")
def bench_rollout_cmd(
    preset: Annotated[str, typer.Option(help="Model preset (freshly initialised: timing only).")] = "small",
    horizon: Annotated[int, typer.Option(help="Frames to generate.")] = 20,
    batch: Annotated[int, typer.Option(help="Rollouts in one batch.")] = 8,
    k: Annotated[int, typer.Option(help="Shortcut steps per frame.")] = 4,
    grid: Annotated[str, typer.Option(help="Token grid per frame, HxW (16x16 = ViT-B/16 at 256 px).")] = "6x6",
    enc_dim: Annotated[int, typer.Option(help="Token width (768 for ViT-B).")] = 32,
    window: Annotated[int | None, typer.Option(help="Time-attention window (default context + horizon).")] = None,
    device: Device = "auto",
) -> None:
    """KV-cached vs uncached rollout of the same model and noise: time, speedup and their max difference."""
    result = bench_rollout(preset_name=preset, horizon=horizon, batch=batch, k=k,
                           grid=hxw(grid, "--grid", "6x6 or 16x16"), enc_dim=enc_dim, window=window, device=device)
    print_result(f"rollout: {preset}, horizon {horizon}", result)


@app.command("plan")
def bench_plan_cmd(
    presets: Annotated[str, typer.Option(help="Comma-separated model presets.")] = "tiny,small,base",
    samples: Annotated[int, typer.Option(help="CEM samples.")] = 64,
    iterations: Annotated[int, typer.Option(help="CEM iterations.")] = 5,
    horizon: Annotated[int, typer.Option(help="Planning horizon (frames).")] = 5,
    grid: Annotated[str, typer.Option(help="Token grid per frame, HxW.")] = "6x6",
    enc_dim: Annotated[int, typer.Option(help="Token width.")] = 32,
    device: Device = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="Also time it torch.compiled, side by side.")] = False,
    graph: Annotated[bool, typer.Option("--graph", help="Also time the rollouts replayed as CUDA graphs, side by "
                                        "side (CUDA only).")] = False,
    cem: Annotated[str, typer.Option("--cem", help="default | dinowm | icem | fast: the budget's other settings "
                                     "(noise, kept elites); --samples and --iterations as given.")] = "default",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32, as `plan`'s.")
                         ] = "auto",
) -> None:
    """Milliseconds per MPC step (one CEM optimisation) and model evaluations per step, per preset."""
    dev = bench_device(device)
    if graph and dev.type != "cuda":
        raise UserError(f"--graph times CUDA graphs and this run is on {dev}: run it on a GPU (--device cuda), "
                        "or drop --graph (--compile is the CPU's option)")
    dtype = inference_dtype(precision, dev)
    cases = [_fresh_case(p, hxw(grid, "--grid", "6x6 or 16x16"), enc_dim, dev, dtype) for p in split_list(presets)]
    result = bench_plan(cases, samples=samples, iterations=iterations, horizon=horizon, device=dev,
                        compile_fn=LoadedWorldModel.compile if compile else None,
                        cem=None if cem == "default" else search_configs("cem", horizon, cem)[0], graph=graph)
    _plan_table(result, samples, iterations, horizon, compile, graph)


def _fresh_case(preset: str, grid: tuple[int, int], enc_dim: int, dev: torch.device, dtype: torch.dtype
                ) -> BenchCase:
    wm = LoadedWorldModel.fresh(preset, grid=grid, enc_dim=enc_dim, action_dim=2, device=str(dev), dtype=dtype)
    return BenchCase(preset, wm, (wm.shape.latent_tokens, wm.shape.enc_dim), wm.params_M, dtype)


def _plan_table(result: dict, samples: int, iterations: int, horizon: int, compile: bool, graph: bool = False
                ) -> None:
    from rich.table import Table

    table = Table(title=f"plan: CEM {samples}x{iterations}, horizon {horizon}, {result['device']} ({result['cpu']})")
    cols = ["preset", "params (M)", "dtype", "ms / MPC step", "model evals / step", "passes / iteration"]
    cols += ["compiled ms / step", "speedup", "compile s"] if compile else []
    for col in cols + (["graph ms / step", "speedup", "capture s"] if graph else []):
        table.add_column(col)
    for r in result["rows"]:
        cells = [r["preset"], f"{r['params_M']:.2f}", r["dtype"], f"{r['ms_per_mpc_step']:.0f}",
                 str(r["model_evals_per_step"]), f"{r['model_passes_per_iteration']:g}"]
        if compile:
            cells += [f"{r['ms_per_mpc_step_compiled']:.0f}", f"{r['compile_speedup']:.2f}x", f"{r['compile_s']:.0f}"]
        if graph and "graph_error" in r:
            cells += [r["graph_error"][:60], "", ""]
        elif graph:
            cells += [f"{r['ms_per_mpc_step_graph']:.1f}", f"{r['graph_speedup']:.2f}x", f"{r['capture_s']:.1f}"]
        table.add_row(*cells)
    console().print(table)
    typer.echo(json.dumps(result))


@app.command("train")
def bench_train_cmd(
    store: Annotated[Path, typer.Option(help="Token store.")] = Path("tokens.zarr"),
    preset: Annotated[str, typer.Option(help="Model preset.")] = "small",
    steps: Annotated[int, typer.Option(help="Steps to run; up to 5 warm-up steps are not timed (5+ stay).")] = 30,
    device: Device = "auto",
) -> None:
    """Step time, tokens/s, data-wait share (and MFU on a known GPU) of real training steps on a store."""
    print_result(f"train: {preset} on {store}", bench_train(store=store, preset_name=preset, steps=steps,
                                                             device=device))
