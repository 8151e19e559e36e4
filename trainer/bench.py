"""Benchmarks (not tests): rollout with and without the KV cache, and training throughput (MPC step latency is
`planner.bench`).

Every figure is measured side by side in one process on this machine; ratios come from the same run. Models
for `rollout` are freshly initialised (timing does not depend on the weights); `train` trains on a
real token store. Legend: S = candidate action sequences, H = horizon frames, N = tokens per frame.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from pipeline.machine import machine, resolve_device, timed
from pipeline.stage import UserError
from trainer.api import LoadedWorldModel
from trainer.config import preset
from trainer.sampling import rollout_cached, rollout_uncached

# dense bf16 peak of the GPUs this project is run on (for MFU); others report achieved FLOP/s only
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def bench_rollout(*, preset_name: str = "small", horizon: int = 20, context: int = 4, batch: int = 8, k: int = 4,
                  grid: tuple[int, int] = (6, 6), enc_dim: int = 32, window: int | None = None, repeats: int = 3,
                  device: str = "auto") -> dict[str, Any]:
    """KV-cached vs uncached autoregressive rollout of the same model, same noise: seconds and the speedup.

    window: frames of time attention (default context + horizon: nothing is evicted, so the two must agree and
    max_abs_diff checks it). With a shorter window the cache keeps keys computed when older frames were still
    visible while the reference recomputes the window alone: both are valid sliding-window rollouts, not equal.
    """
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = LoadedWorldModel.fresh(preset_name, grid=grid, enc_dim=enc_dim, action_dim=2, device=str(dev),
                                   dtype=dtype).model
    window = window or context + horizon
    z = torch.randn(batch, context, grid[0] * grid[1], enc_dim, device=dev, dtype=dtype)
    a = torch.randn(batch, context + horizon, model.shape.action_dim, device=dev, dtype=dtype)
    v = torch.ones(batch, context + horizon, dtype=torch.bool, device=dev)
    kw = dict(horizon=horizon, k=k, window=window)

    def run(fn):
        with torch.no_grad():
            return fn(model, z, a, v, generator=torch.Generator().manual_seed(0), **kw)

    cached = timed(lambda: run(rollout_cached), repeats, dev)
    uncached = timed(lambda: run(rollout_uncached), repeats, dev)
    diff = float((run(rollout_cached).float() - run(rollout_uncached).float()).abs().max())
    c, u = statistics.median(cached), statistics.median(uncached)
    return {"preset": preset_name, "device": str(dev), **machine(), "horizon": horizon, "context": context,
            "window": window, "batch": batch, "k": k, "tokens_per_frame": grid[0] * grid[1],
            "cached_s": c, "uncached_s": u, "speedup": u / c, "frames_per_s_cached": batch * horizon / c,
            "max_abs_diff": diff}


def step_flops(cfg, steps: int = 3) -> float:
    """Matmul and attention FLOPs of one training step (forward, backward and the bootstrap passes), counted by
    torch.utils.flop_counter on `steps` real steps after the run in `cfg.out` (which it resumes), averaged (the
    bootstrap rows are drawn per step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.distributed import Dist
    from trainer.loop import train_step
    from trainer.model.common import expanded_kv_heads
    from trainer.prefetch import _loader
    from trainer.run_setup import setup

    cfg = dataclasses.replace(cfg, steps=cfg.steps + steps, compile=False, num_workers=0)
    tr, start, reader = setup(cfg, resume=True, d=Dist())
    batches = _loader(reader, tr, start + 1)
    counts = []
    for s in range(steps):
        with expanded_kv_heads(), FlopCounterMode(display=False) as fc:
            train_step(tr, next(batches), start + 1 + s)
        counts.append(fc.get_total_flops())
    return statistics.fmean(counts)


def bench_train(*, store: Path, preset_name: str = "small", steps: int = 30, out: Path | None = None,
                device: str = "auto", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `steps` steps on a real store; step time, tokens/s and data-wait share over the steps after warm-up,
    FLOPs per step as counted, the achieved FLOP/s and (on a GPU whose bf16 peak is known) MFU."""
    import tempfile

    from trainer.loop import run_train

    if not Path(store).exists():
        raise UserError(f"no token store at {store} (run `wmctl encode` first)")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="wmctl-bench-train-")
        out = Path(tmp.name) / "run"
    cfg = dataclasses.replace(preset(preset_name), store=Path(store), out=out, steps=steps, eval_every=10**9,
                              ckpt_every=10**9, device=device, **(overrides or {}))
    rows: list[dict[str, Any]] = []
    run_train(cfg, on_step=rows.append)
    skip = min(5, max(0, len(rows) - 5))  # up to 5 warm-up steps (worker start, allocator), keeping >= 5 timed
    body = rows[skip:]
    step_s = statistics.median(r["step_time"] for r in body)
    wait = sum(r["data_wait"] for r in body) / sum(r["step_time"] for r in body)
    tok_s = statistics.median(r["tokens_per_s"] for r in body)
    wm = LoadedWorldModel.load(out)
    used = resolve_device(device)
    result = {"preset": preset_name, "device": str(used), **machine(), "steps_timed": len(body),
              "batch_size": cfg.batch_size, "context": cfg.context_frames, "compile": cfg.compile, "step_s": step_s,
              "tokens_per_s": tok_s, "data_wait_share": wait, "params_M": wm.params_M}
    try:
        flops = step_flops(cfg)
    except Exception as e:  # noqa: BLE001 - the timings above stand; say why the count is missing
        result["flops_error"] = f"{type(e).__name__}: {e}"
    else:
        result.update(flops_per_step=flops, achieved_tflops=flops / step_s / 1e12)
        peak = next((v for k, v in PEAK_BF16.items() if k in result.get("gpu", "")), None)
        if peak and used.type == "cuda":
            result["mfu"] = flops / step_s / peak
    if tmp is not None:
        tmp.cleanup()
    return result


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, default=str)
