"""Benchmarks (not tests): rollout with and without the KV cache, MPC step latency, and training throughput.

Every figure is measured side by side in one process on this machine; ratios come from the same run. Models
for `rollout` and `plan` are freshly initialised (timing does not depend on the weights); `train` trains on a
real token store. Legend: S = candidate action sequences, H = horizon frames, N = tokens per frame.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.stage import UserError
from trainer.config import preset
from trainer.model.dynamics import ShortcutDynamics, TokenShape
from trainer.sampling import compile_for_rollouts, rollout_cached, rollout_uncached

# dense bf16 peak of the GPUs this project is run on (for MFU); others report achieved FLOP/s only
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int, dev: torch.device) -> list[float]:
    fn()  # warm-up (allocator, kernels)
    _sync(dev)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def _model(preset_name: str, grid: tuple[int, int], enc_dim: int, action_dim: int, dev: torch.device,
           dtype: torch.dtype) -> ShortcutDynamics:
    cfg = preset(preset_name)
    shape = TokenShape(cameras=1, grid=grid, enc_dim=enc_dim, action_dim=action_dim * cfg.frameskip)
    torch.manual_seed(0)
    return ShortcutDynamics(cfg.model, shape).to(dev, dtype).eval()


def bench_rollout(*, preset_name: str = "small", horizon: int = 20, context: int = 4, batch: int = 8, k: int = 4,
                  grid: tuple[int, int] = (6, 6), enc_dim: int = 32, window: int | None = None, repeats: int = 3,
                  device: str = "auto") -> dict[str, Any]:
    """KV-cached vs uncached autoregressive rollout of the same model, same noise: seconds and the speedup.

    window: frames of time attention (default context + horizon: nothing is evicted, so the two must agree and
    max_abs_diff checks it). With a shorter window the cache keeps keys computed when older frames were still
    visible while the reference recomputes the window alone: both are valid sliding-window rollouts, not equal.
    """
    dev = _device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = _model(preset_name, grid, enc_dim, 2, dev, dtype)
    window = window or context + horizon
    z = torch.randn(batch, context, grid[0] * grid[1], enc_dim, device=dev, dtype=dtype)
    a = torch.randn(batch, context + horizon, model.shape.action_dim, device=dev, dtype=dtype)
    v = torch.ones(batch, context + horizon, dtype=torch.bool, device=dev)
    kw = dict(horizon=horizon, k=k, window=window)

    def run(fn):
        with torch.no_grad():
            return fn(model, z, a, v, generator=torch.Generator().manual_seed(0), **kw)

    cached = _timed(lambda: run(rollout_cached), repeats, dev)
    uncached = _timed(lambda: run(rollout_uncached), repeats, dev)
    diff = float((run(rollout_cached).float() - run(rollout_uncached).float()).abs().max())
    c, u = statistics.median(cached), statistics.median(uncached)
    return {"preset": preset_name, "device": str(dev), **machine(), "horizon": horizon, "context": context,
            "window": window, "batch": batch, "k": k, "tokens_per_frame": grid[0] * grid[1],
            "cached_s": c, "uncached_s": u, "speedup": u / c, "frames_per_s_cached": batch * horizon / c,
            "max_abs_diff": diff}


def bench_plan(*, presets: tuple[str, ...] = ("tiny", "small", "base"), samples: int = 64, iterations: int = 5,
               horizon: int = 5, context: int = 4, k: int = 4, grid: tuple[int, int] = (6, 6), enc_dim: int = 32,
               action_dim: int = 2, repeats: int = 3, device: str = "auto", compile: bool = False) -> dict[str, Any]:
    """Milliseconds per MPC step (one full CEM optimisation, all samples in one batched cached rollout).
    `compile`: the same, then again after `compile_for_rollouts` in the same process (the first, compiling
    step timed apart), with the largest difference between the eager and the compiled rollout."""
    from planner.cem import CEMConfig, cem_plan
    from planner.core import ActionSpec, latent_cost

    dev = _device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for name in presets:
        model = _model(name, grid, enc_dim, action_dim, dev, dtype)
        A = model.shape.action_dim
        window = preset(name).context_frames
        ctx = torch.randn(context, grid[0] * grid[1], enc_dim, device=dev, dtype=dtype)
        goal = torch.randn(grid[0] * grid[1], enc_dim, device=dev, dtype=dtype)
        spec = ActionSpec(low=(-1.0,) * A, high=(1.0,) * A, max_delta=None)
        calls = {"n": 0}

        def rollout(cand_SHA, model=model, ctx=ctx, window=window, A=A, calls=calls):
            calls["n"] += 1
            S = cand_SHA.shape[0]
            acts = torch.cat([torch.zeros(S, context, A, device=dev, dtype=dtype), cand_SHA.to(dtype)], 1)
            valid = torch.ones(acts.shape[:2], dtype=torch.bool, device=dev)
            valid[:, :context] = False
            return rollout_cached(model, ctx[None].expand(S, -1, -1, -1), acts, valid, horizon=cand_SHA.shape[1],
                                  k=k, window=window, generator=torch.Generator().manual_seed(0),
                                  shared_noise=True).float()

        cost = latent_cost(goal.float())
        cfg = CEMConfig(horizon=horizon, samples=samples, elites=max(1, samples // 8), iterations=iterations)

        def step(rollout=rollout, cost=cost, spec=spec, cfg=cfg):
            cem_plan(rollout, cost, spec, cfg, generator=torch.Generator().manual_seed(0), device=dev)

        times = _timed(step, repeats, dev)
        params = sum(p.numel() for p in model.parameters())
        row = {"preset": name, "params_M": params / 1e6, "ms_per_mpc_step": 1000 * statistics.median(times),
               "model_evals_per_step": samples * iterations * horizon * (k + 1),
               "rollout_calls_per_step": calls["n"] // (repeats + 1)}
        if compile:
            probe = torch.rand(samples, horizon, A, device=dev, dtype=dtype) * 2 - 1
            with torch.no_grad():
                eager = rollout(probe)
                torch._dynamo.reset()  # compiled code of the previous preset's model would count against the limit
                compile_for_rollouts(model)
                t0 = time.perf_counter()
                compiled = rollout(probe)
                _sync(dev)
                row["compile_s"] = time.perf_counter() - t0
            ctimes = _timed(step, repeats, dev)
            row.update(ms_per_mpc_step_compiled=1000 * statistics.median(ctimes),
                       compile_speedup=statistics.median(times) / statistics.median(ctimes),
                       compiled_max_abs_diff=float((compiled - eager).abs().max()))
        rows.append(row)
    return {"device": str(dev), **machine(), "samples": samples, "iterations": iterations, "horizon": horizon,
            "k": k, "tokens_per_frame": grid[0] * grid[1], "rows": rows}


def _train_flops_per_token(model: torch.nn.Module) -> float:
    """6 x parameters per token (forward + backward), the usual dense estimate (attention not counted)."""
    return 6.0 * sum(p.numel() for p in model.parameters())


def bench_train(*, store: Path, preset_name: str = "small", steps: int = 30, out: Path | None = None,
                device: str = "auto", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `steps` steps on a real store; step time, tokens/s and data-wait share over the steps after warm-up."""
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
    res = run_train(cfg, on_step=rows.append)
    skip = min(5, max(0, len(rows) - 5))  # up to 5 warm-up steps (worker start, allocator), keeping >= 5 timed
    body = rows[skip:]
    step_s = statistics.median(r["step_time"] for r in body)
    wait = sum(r["data_wait"] for r in body) / sum(r["step_time"] for r in body)
    tok_s = statistics.median(r["tokens_per_s"] for r in body)
    from trainer.api import LoadedWorldModel

    wm = LoadedWorldModel.load(res.last_checkpoint)
    flops = _train_flops_per_token(wm.model) * tok_s
    used = _device(device)
    result = {"preset": preset_name, "device": str(used), **machine(), "steps_timed": len(body),
              "batch_size": cfg.batch_size, "context": cfg.context_frames, "step_s": step_s, "tokens_per_s": tok_s,
              "data_wait_share": wait, "params_M": sum(p.numel() for p in wm.model.parameters()) / 1e6,
              "achieved_tflops": flops / 1e12}
    gpu = result.get("gpu", "")
    peak = next((v for k, v in _PEAK_BF16.items() if k in gpu), None)
    if peak and used.type == "cuda":
        result["mfu"] = flops / peak
    if tmp is not None:
        tmp.cleanup()
    return result


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, default=str)
