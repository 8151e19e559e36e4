"""`wmctl bench plan`: milliseconds per MPC step (one whole CEM optimisation) of world models behind the planner's
`WorldModel` protocol, eager and (optionally) compiled side by side in one process, with the machine named.

The models come from the caller (the CLI builds freshly initialised ones per preset: timing does not depend on
the weights). Legend: S = candidate action sequences, H = horizon frames, N = tokens per frame, Z = width.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.machine import machine, synchronize, timed
from planner.cem import CEMConfig, cem_plan
from planner.core import ActionSpec, WorldModel, dtype_name, latent_cost


@dataclasses.dataclass(frozen=True)
class BenchCase:
    name: str
    wm: WorldModel
    latent_shape: tuple[int, int]  # (N, Z) of one frame
    params_M: float
    dtype: torch.dtype = torch.float32


def bench_plan(cases: list[BenchCase], *, samples: int = 64, iterations: int = 5, horizon: int = 5,
               context: int = 4, k: int = 4, repeats: int = 3, device: torch.device | None = None,
               compile_fn: Callable[[WorldModel], None] | None = None, cem: CEMConfig | None = None,
               graph: bool = False) -> dict[str, Any]:
    """Per case: ms per MPC step with all samples in one batched cached rollout per CEM iteration (`cem`: the
    other settings of a named budget, e.g. iCEM's noise; samples and iterations as given). With
    `compile_fn`, the same after compiling the model in place (the first, compiling step timed apart), and the
    largest difference between the eager and the compiled rollout. With `graph` (CUDA), the same with the
    eager rollouts replayed as CUDA graphs (`use_graphs`; the first, capturing call timed apart; a failure is
    reported in the row as `graph_error`); off CUDA the graphs' code runs uncaptured (`graph_captured` false: a
    check that the path runs, not a speed)."""
    device = device or torch.device("cpu")
    captured = device.type == "cuda"  # CUDA graphs are captured; elsewhere their code runs uncaptured
    rows = []
    for case in cases:
        wm, (N, Zd) = case.wm, case.latent_shape
        A = wm.actions.frame_dim
        ctx = torch.randn(context, N, Zd, device=device, dtype=case.dtype)
        goal = torch.randn(N, Zd, device=device, dtype=case.dtype)
        spec = ActionSpec(low=(-1.0,) * A, high=(1.0,) * A, max_delta=None)
        calls = {"n": 0, "ctx_passes": 0, "passes": 0}
        cost = latent_cost(goal.float())
        cfg = dataclasses.replace(cem or CEMConfig(), horizon=horizon, samples=samples,
                                  elites=min(samples, (cem.elites if cem else max(1, samples // 8))),
                                  iterations=iterations)

        def step(wm=wm, ctx=ctx, calls=calls, cost=cost, spec=spec, cfg=cfg):
            """One MPC step: commit the context, then the CEM optimisation."""
            with torch.no_grad():
                model_rollout = wm.planning_rollout(ctx, k=k, seed=0)
            calls["ctx_passes"] = calls["passes"]

            def rollout(cand_SHA):
                calls["n"] += 1
                return model_rollout(cand_SHA).float()

            return cem_plan(rollout, cost, spec, cfg, generator=torch.Generator().manual_seed(0), device=device)

        passes = _count_passes(wm, step, calls)  # one untimed step, the network's calls counted
        times = timed(step, repeats, device)
        row = {"preset": case.name, "params_M": case.params_M, "dtype": dtype_name(case.dtype),
               "ms_per_mpc_step": 1000 * statistics.median(times),
               "model_evals_per_step": samples * iterations * horizon * k, **passes}
        probe = torch.rand(samples, horizon, A, device=device) * 2 - 1
        if graph:
            try:
                capture_s, gtimes, diff = _switched(wm, lambda m: m.use_graphs(capture=captured), step, ctx, probe,
                                                    k, repeats, device)
                row.update(capture_s=capture_s, ms_per_mpc_step_graph=1000 * statistics.median(gtimes),
                           graph_speedup=statistics.median(times) / statistics.median(gtimes),
                           graph_max_abs_diff=diff, graphs=len(wm.graphs), graph_captured=captured)
            except Exception as e:  # noqa: BLE001 - a capture that fails is a figure too; the eager ones stand
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                wm.graphs = None
        if compile_fn is not None:
            def compiled(m):
                torch._dynamo.reset()  # compiled code of the previous case's model would count against the limit
                compile_fn(m)

            row["compile_s"], ctimes, diff = _switched(wm, compiled, step, ctx, probe, k, repeats, device)
            row.update(ms_per_mpc_step_compiled=1000 * statistics.median(ctimes),
                       compile_speedup=statistics.median(times) / statistics.median(ctimes),
                       compiled_max_abs_diff=diff)
        rows.append(row)
    return {"device": str(device), **machine(), "samples": samples, "iterations": iterations, "horizon": horizon,
            "k": k, "tokens_per_frame": cases[0].latent_shape[0] if cases else 0, "rows": rows}


def _switched(wm, switch: Callable[[Any], None], step: Callable[[], Any], ctx: torch.Tensor, probe: torch.Tensor,
              k: int, repeats: int, device: torch.device) -> tuple[float, list[float], float]:
    """Put the model on another execution path (`switch(wm)`: compiled, CUDA graphs) and time it as the eager one
    was: the seconds of the first call on the new path (compiling, capturing), the MPC step's times, and the
    largest difference between the probe candidates' rollouts before and after the switch."""
    with torch.no_grad():
        before = wm.planning_rollout(ctx, k=k, seed=0)(probe).float()
        switch(wm)
        t0 = time.perf_counter()
        after = wm.planning_rollout(ctx, k=k, seed=0)(probe).float()
        synchronize(device)
        first_s = time.perf_counter() - t0
    return first_s, timed(step, repeats, device), float((after - before).abs().max())


def _count_passes(wm: WorldModel, step: Callable[[], Any], calls: dict[str, int]) -> dict[str, float]:
    """Run one MPC step with the network's per-pass call (`denoise`, or `forward` of a teacher-forced model)
    counted: passes committing the context, and passes per CEM iteration (one rollout call each)."""
    net = wm.model
    name = "denoise" if hasattr(net, "denoise") else "forward"
    own, real = name in net.__dict__, getattr(net, name)  # an instance attribute when compiled

    def counting(*args, **kw):
        calls["passes"] += 1
        return real(*args, **kw)

    calls.update(n=0, passes=0, ctx_passes=0)
    setattr(net, name, counting)
    try:
        step()
    finally:
        if own:
            setattr(net, name, real)
        else:
            delattr(net, name)
    per_call = (calls["passes"] - calls["ctx_passes"]) / max(1, calls["n"])
    return {"model_passes_per_iteration": per_call, "context_passes_per_step": calls["ctx_passes"],
            "rollout_calls_per_step": calls["n"]}
