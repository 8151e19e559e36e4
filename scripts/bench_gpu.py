"""`make bench-gpu`: the figures a GPU user pays for, in one script, with RANDOM weights at real sizes.

    python scripts/bench_gpu.py [--size gpu|cpu] [--out bench-gpu.json] [--budget-s 420]

Sections (each timed, each guarded: one that fails or would pass the time budget is reported, not fatal):
  encoder   images/s of a DINOv3 ViT-B/16 (random weights, 224x224, bf16 on CUDA), batch of pixels on the device
  encode    the whole `wmctl encode` pipeline (PyAV decode, preprocess, encoder, Zarr write) on the built-in
            multi-camera data (3 x 180x320 AV1 cameras), frames/s; needs PyAV, zarr and that data
  train     `base` training steps on a synthetic 3-camera store (14x14 tokens of width 768 per camera, the
            shapes of ViT-B/16 at 224): step time, tokens/s, FLOPs per step (counted), data-wait share, MFU
  plan      ms per MPC step (CEM, all samples batched, context committed once) for `small` and `base`,
            eager, replayed as CUDA graphs (on CPU: the graphs' code uncaptured) and torch.compiled, on two
            cameras (an exterior and a wrist camera)
  generate  frames/s of `base` generating with K=4 and the KV cache (the Dreamer 4 comparison)
`--size cpu` runs the same code at small sizes (CI runs it, so the script cannot rot). Writes the JSON and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import os  # noqa: E402

import torch  # noqa: E402

os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder of the built-in data: errors only

from pipeline.machine import machine, resolve_device, timed  # noqa: E402

SIZES = {
    "gpu": dict(encoder="vitb16", images=2048, enc_batch=256, train_preset="base", cams=3, grid=14, dim=768,
                episodes=12, frames=80, train_steps=20, plan_presets=("small", "base"), plan_samples=300,
                plan_iterations=3, gen_preset="base", gen_batch=8, gen_horizon=16, encode_batch=64, compile=True),
    "cpu": dict(encoder="tiny", images=64, enc_batch=32, train_preset="tiny", cams=3, grid=4, dim=32,
                episodes=6, frames=24, train_steps=8, plan_presets=("tiny",), plan_samples=16,
                plan_iterations=2, gen_preset="tiny", gen_batch=2, gen_horizon=4, encode_batch=16, compile=False),
}
DATA = ROOT / "bench" / "gpu-data"  # default --data: the built-in multi-camera set and its manifest


def bench_encoder(s: dict, dev: torch.device, tmp: Path) -> dict:
    from featurestore.encoders import HFDinoEncoder, Preprocess, init_random_dinov3

    path = init_random_dinov3(tmp / f"dinov3-{s['encoder']}", preset=s["encoder"])
    enc = HFDinoEncoder(str(path), preprocess=Preprocess(height=224, width=224), device=str(dev))
    pixels = torch.randn(s["enc_batch"], 3, 224, 224, device=dev)
    n = max(1, s["images"] // s["enc_batch"])
    times = timed(lambda: [enc.forward_preprocessed(pixels) for _ in range(n)], 2, dev)
    res = {"encoder_images_per_s": n * s["enc_batch"] / min(times), "encoder_batch": s["enc_batch"],
           "encoder_params_M": sum(p.numel() for p in enc.model.parameters()) / 1e6, "encoder_bf16": enc.autocast,
           "encoder_attention": str(getattr(enc.model.config, "_attn_implementation", "?")),
           "encoder_dir": str(path)}
    if dev.type == "cuda":  # where the time goes: the network alone (no copy back to the host), then bf16 weights
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            t = timed(lambda: [enc.model(pixel_values=pixels) for _ in range(n)], 2, dev)
        res["encoder_network_only_images_per_s"] = n * s["enc_batch"] / min(t)
        enc.model.to(torch.bfloat16)
        px = pixels.to(torch.bfloat16)
        with torch.inference_mode():
            t = timed(lambda: [enc.model(pixel_values=px) for _ in range(n)], 2, dev)
        res["encoder_bf16_weights_images_per_s"] = n * s["enc_batch"] / min(t)
    return res


def prepare_data(out: Path) -> Path:
    """The built-in multi-camera set (lerobot writes it) and its manifest, here once; the GPU machine gets them
    carried (it has no lerobot)."""
    manifest = out / "multicam.parquet"
    if manifest.exists():
        return manifest
    from pipeline.demodata.multicam import MulticamDataConfig, run_data_multicam
    from pipeline.ingest import run_ingest
    from pipeline.ingest_config import IngestConfig

    root = out / "multicam"
    run_data_multicam(MulticamDataConfig(out=root, episodes=8, seed=0, repo_id="local/multicam"))
    run_ingest(IngestConfig(source="multicam", root=root, repo_id="local/multicam", out=manifest, val_fraction=0.2))
    return manifest


def relocated(manifest: Path, root: Path, tmp: Path) -> Path:
    """The manifest with its dataset root pointed at `root` (the data was carried to another machine)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(manifest)
    i = table.schema.get_field_index("root")
    table = table.set_column(i, "root", pa.array([str(root.resolve())] * len(table), pa.string()))
    out = tmp / manifest.name
    pq.write_table(table, out)
    return out


def bench_encode(s: dict, dev: torch.device, tmp: Path, encoder_dir: str, data: Path) -> dict:
    from featurestore.encode import EncodeConfig, run_encode
    from featurestore.encoders import Preprocess

    manifest = prepare_data(data)
    cfg = EncodeConfig(manifest=relocated(manifest, data / "multicam", tmp), store=tmp / "encode.zarr",
                       encoder=encoder_dir, preprocess=Preprocess(height=224, width=224),
                       batch_size=s["encode_batch"], device=str(dev))
    t0 = time.perf_counter()
    res = run_encode(cfg)
    wall = time.perf_counter() - t0
    return {"encode_frames_per_s": res.frames / res.seconds, "encode_images_per_s": 3 * res.frames / res.seconds,
            "encode_frames": res.frames, "encode_cameras": 3, "encode_wall_s": wall, "encode_failures": len(res.failures)}


def bench_train_step(s: dict, dev: torch.device, tmp: Path, compile: bool) -> dict:
    from featurestore.synthetic import write_random_store
    from trainer.bench import bench_train

    store = tmp / "train.zarr"
    if not store.exists():
        write_random_store(store, cameras=s["cams"], grid=(s["grid"], s["grid"]), dim=s["dim"],
                           episodes=s["episodes"], frames=s["frames"])
    res = bench_train(store=store, preset_name=s["train_preset"], steps=s["train_steps"], device=str(dev),
                      out=tmp / f"run-{int(compile)}", overrides={"compile": compile, "bootstrap_start": 0})
    tag = "compiled" if compile else "eager"
    return {f"train_{tag}_{k}": v for k, v in res.items() if k in (
        "step_s", "tokens_per_s", "data_wait_share", "flops_per_step", "achieved_tflops", "mfu", "params_M",
        "batch_size", "context")}


def bench_planning(s: dict, dev: torch.device) -> dict:
    from planner.bench import BenchCase, bench_plan
    from trainer.api import LoadedWorldModel

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = {}
    for name in s["plan_presets"]:
        wm = LoadedWorldModel.fresh(name, grid=(s["grid"], s["grid"]), enc_dim=s["dim"], action_dim=4, cameras=2,
                                    device=str(dev), dtype=dtype)
        case = BenchCase(name, wm, (wm.shape.latent_tokens, wm.shape.enc_dim), wm.params_M, dtype)
        r = bench_plan([case], samples=s["plan_samples"], iterations=s["plan_iterations"], horizon=5, context=2,
                       device=dev, repeats=2, compile_fn=LoadedWorldModel.compile if s["compile"] else None,
                       graph=True)["rows"][0]
        out.update({f"plan_{name}_{k}": v for k, v in r.items() if k != "preset"})
    out.update(plan_samples=s["plan_samples"], plan_iterations=s["plan_iterations"], plan_horizon=5, plan_k=4,
               plan_cameras=2)
    return out


def bench_generate(s: dict, dev: torch.device) -> dict:
    from trainer.bench import bench_rollout

    r = bench_rollout(preset_name=s["gen_preset"], horizon=s["gen_horizon"], batch=s["gen_batch"], k=4,
                      grid=(s["grid"], s["grid"]), enc_dim=s["dim"], device=str(dev), repeats=2)
    return {"generate_frames_per_s": r["frames_per_s_cached"], "generate_cached_s": r["cached_s"],
            "generate_uncached_s": r["uncached_s"], "generate_batch": s["gen_batch"], "generate_horizon":
            s["gen_horizon"], "generate_max_abs_diff_vs_uncached": r["max_abs_diff"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench-gpu.json"))
    p.add_argument("--budget-s", type=float, default=420.0, help="skip sections once this much time has passed")
    p.add_argument("--only", default="", help="comma-separated sections to run (default all)")
    p.add_argument("--data", type=Path, default=DATA, help="holds multicam/ and multicam.parquet (made if absent)")
    a = p.parse_args()
    s, dev = SIZES[a.size], resolve_device("auto")
    t0 = time.monotonic()
    res: dict = {"size": a.size, "device": str(dev), **machine(), "torch": torch.__version__, "sections": {},
                 "note": "RANDOM weights at real shapes: timing only"}
    tmp = Path(tempfile.mkdtemp(prefix="wmctl-bench-gpu-"))
    sections = [("encoder", lambda: bench_encoder(s, dev, tmp)),
                ("encode", lambda: bench_encode(s, dev, tmp, res.get("encoder_dir", ""), a.data)),
                ("train", lambda: bench_train_step(s, dev, tmp, compile=False)),
                ("generate", lambda: bench_generate(s, dev)),
                ("plan", lambda: bench_planning(s, dev)),
                ("train_compiled", lambda: bench_train_step(s, dev, tmp, compile=True))]
    only = set(filter(None, a.only.split(",")))
    if not s["compile"]:  # compiling takes minutes on a CPU; the slow test suite checks compiled rollouts there
        sections = [x for x in sections if x[0] != "train_compiled"]
    for name, fn in sections:
        if only and name not in only:
            continue
        if time.monotonic() - t0 > a.budget_s:
            res["sections"][name] = "skipped: time budget spent"
            continue
        start = time.monotonic()
        try:
            res.update(fn())
            res["sections"][name] = f"ok in {time.monotonic() - start:.1f} s"
        except Exception as e:  # noqa: BLE001 - a benchmark section's failure is a figure too
            res["sections"][name] = f"failed: {type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        a.out.write_text(json.dumps(res, indent=2, default=str))  # what is measured survives a kill
        print(f"[{time.monotonic() - t0:6.1f} s] {name}: {res['sections'][name]}", flush=True)
    res["total_s"] = time.monotonic() - t0
    a.out.write_text(json.dumps(res, indent=2, default=str))
    print(f"\n{res.get('gpu', res['cpu'])}, torch {torch.__version__}, size {a.size}\n\n| figure | value |\n|---|---|")
    for k, v in res.items():
        if k not in ("sections", "note") and isinstance(v, (int, float)) and not isinstance(v, bool):
            print(f"| {k} | {v:.4g} |")
    print(f"\nsections: {json.dumps(res['sections'])}\nwrote {a.out}")


if __name__ == "__main__":
    main()
