"""`wmctl bench plan`: milliseconds per MPC step (one whole planner step: a CEM optimisation, or with the amortized
proposal CEM seeded by it or its forward pass alone) of world models behind the planner's `WorldModel` protocol,
eager and (optionally) compiled side by side in one process, with the machine named. One row per model and planner.

The models come from the caller (the CLI builds freshly initialised ones per preset: timing does not depend on
the weights), and so may the proposals (else freshly initialised ones). Legend: S = candidate action sequences,
H = horizon frames, N = tokens per frame, Z = width.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.machine import machine, synchronize, timed
from planner.cem import CEMConfig
from planner.core import ActionSpec, WorldModel, dtype_name, latent_cost
from planner.planners import PLANNERS, check_planner, plan
from planner.proposal import Observation, Proposal, ProposalPlanConfig


@dataclasses.dataclass(frozen=True)
class BenchCase:
    name: str
    wm: WorldModel
    latent_shape: tuple[int, int]  # (N, Z) of one frame
    params_M: float
    dtype: torch.dtype = torch.float32
    proposal: Proposal | None = None  # for the proposal planners' rows (None: a freshly initialised one)


def bench_plan(cases: list[BenchCase], *, samples: int = 64, iterations: int = 5, horizon: int = 5,
               context: int = 4, k: int = 4, repeats: int = 3, device: torch.device | None = None,
               compile_fn: Callable[[WorldModel], None] | None = None, cem: CEMConfig | None = None,
               graph: bool = False, planners: tuple[str, ...] = ("cem",)) -> dict[str, Any]:
    """Per case and planner (`planners`: names of `planner.planners.PLANNERS`; `cem+proposal` and `proposal` time
    the amortized proposal's forward pass too, a freshly initialised one unless the case brings one): ms per MPC
    step with all samples in one batched cached rollout per CEM iteration (`cem`: the other settings of a named
    budget, e.g. iCEM's noise; samples and iterations as given). With `compile_fn`, the same after compiling the
    model in place (the first, compiling step timed apart), and the largest difference between the eager and the
    compiled rollout. With `graph` (CUDA), the same with the eager rollouts replayed as CUDA graphs (`use_graphs`;
    the first, capturing call timed apart; a failure is reported in the row as `graph_error`); off CUDA the graphs'
    code runs uncaptured (`graph_captured` false: a check that the path runs, not a speed)."""
    device = device or torch.device("cpu")
    for name in planners:
        check_planner(name)
    rows = []
    for case in cases:
        setup = _Setup.of(case, samples, iterations, horizon, context, k, device, cem, planners)
        case_rows = [_eager_row(case, setup, name, repeats, device) for name in planners]
        if graph:
            _graph_columns(case, setup, case_rows, repeats, device)
        if compile_fn is not None:
            _compiled_columns(case, setup, case_rows, compile_fn, repeats, device)
        rows += case_rows
    return {"device": str(device), **machine(), "samples": samples, "iterations": iterations, "horizon": horizon,
            "k": k, "tokens_per_frame": cases[0].latent_shape[0] if cases else 0, "rows": rows}


@dataclasses.dataclass
class _Setup:
    """One case's MPC step per planner (`steps`), its context and probe candidates, and the network's call count."""

    steps: dict[str, Callable[[], Any]]
    ctx: torch.Tensor
    probe: torch.Tensor
    calls: dict[str, int]
    k: int
    model_evals: int  # per CEM step
    proposal: Proposal | None  # the proposal planners'

    @classmethod
    def of(cls, case: BenchCase, samples: int, iterations: int, horizon: int, context: int, k: int,
           device: torch.device, cem: CEMConfig | None, planners: tuple[str, ...]) -> _Setup:
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
        needs = any(PLANNERS[p].proposal for p in planners)
        proposal = case.proposal if case.proposal is not None or not needs else _fresh_proposal(wm)
        obs = Observation(wm, ctx[-1].float(), goal.float(), proposal)

        def step(name: str):
            """One MPC step: commit the context (a planner that rolls the model out), then plan."""
            model_rollout = None
            if PLANNERS[name].rollout:
                with torch.no_grad():
                    model_rollout = wm.planning_rollout(ctx, k=k, seed=0)
                calls["ctx_passes"] = calls["passes"]

            def rollout(cand_SHA):
                calls["n"] += 1
                return model_rollout(cand_SHA).float()

            return plan(name, rollout, cost, spec, cfg if name != "proposal" else ProposalPlanConfig(),
                        horizon=horizon, generator=torch.Generator().manual_seed(0), observation=obs, device=device)

        probe = torch.rand(samples, horizon, A, device=device) * 2 - 1
        return cls({name: functools.partial(step, name) for name in planners}, ctx, probe, calls, k,
                   samples * iterations * horizon * k, proposal)


def _fresh_proposal(wm: WorldModel) -> Proposal:
    from trainer.proposal import fresh_proposal  # timing only: its weights do not matter

    return fresh_proposal(wm)


def _eager_row(case: BenchCase, setup: _Setup, name: str, repeats: int, device: torch.device) -> dict[str, Any]:
    """One planner's row: ms per MPC step (eager), the model evaluations and network passes it takes."""
    step = setup.steps[name]
    passes = _count_passes(case.wm, step, setup.calls)  # one untimed step, the network's calls counted
    times = timed(step, repeats, device)
    row = {"preset": case.name, "planner": name, "params_M": case.params_M, "dtype": dtype_name(case.dtype),
           "ms_per_mpc_step": 1000 * statistics.median(times),
           "model_evals_per_step": setup.model_evals if PLANNERS[name].rollout else 0, **passes}
    if PLANNERS[name].proposal:
        row["proposal_params_M"] = getattr(setup.proposal, "params", 0) / 1e6
    return row


def _graph_columns(case: BenchCase, setup: _Setup, rows: list[dict[str, Any]], repeats: int,
                   device: torch.device) -> None:
    """Each row's MPC step with the eager rollouts replayed as CUDA graphs (uncaptured off CUDA)."""
    captured = device.type == "cuda"  # CUDA graphs are captured; elsewhere their code runs uncaptured
    wm = case.wm
    try:
        capture_s, gtimes, diff = _switched(wm, lambda m: m.use_graphs(capture=captured), setup, repeats, device)
        for row in rows:
            eager, graphed = row["ms_per_mpc_step"], 1000 * statistics.median(gtimes[row["planner"]])
            row.update(capture_s=capture_s, ms_per_mpc_step_graph=graphed, graph_speedup=eager / graphed,
                       graph_max_abs_diff=diff, graphs=len(wm.graphs), graph_captured=captured)
    except Exception as e:  # noqa: BLE001 - a capture that fails is a figure too; the eager ones stand
        for row in rows:
            row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        wm.graphs = None


def _compiled_columns(case: BenchCase, setup: _Setup, rows: list[dict[str, Any]],
                      compile_fn: Callable[[WorldModel], None], repeats: int, device: torch.device) -> None:
    """Each row's MPC step with the model compiled in place (the previous case's compiled code dropped first)."""
    def compiled(m):
        torch._dynamo.reset()  # compiled code of the previous case's model would count against the limit
        compile_fn(m)

    compile_s, ctimes, diff = _switched(case.wm, compiled, setup, repeats, device)
    for row in rows:
        eager, comp = row["ms_per_mpc_step"], 1000 * statistics.median(ctimes[row["planner"]])
        row.update(compile_s=compile_s, ms_per_mpc_step_compiled=comp, compile_speedup=eager / comp,
                   compiled_max_abs_diff=diff)


def _switched(wm, switch: Callable[[Any], None], setup: _Setup, repeats: int, device: torch.device
              ) -> tuple[float, dict[str, list[float]], float]:
    """Put the model on another execution path (`switch(wm)`: compiled, CUDA graphs) and time it as the eager one
    was: the seconds of the first call on the new path (compiling, capturing), each planner's MPC step times, and
    the largest difference between the probe candidates' rollouts before and after the switch."""
    with torch.no_grad():
        before = wm.planning_rollout(setup.ctx, k=setup.k, seed=0)(setup.probe).float()
        switch(wm)
        t0 = time.perf_counter()
        after = wm.planning_rollout(setup.ctx, k=setup.k, seed=0)(setup.probe).float()
        synchronize(device)
        first_s = time.perf_counter() - t0
    times = {name: timed(step, repeats, device) for name, step in setup.steps.items()}
    return first_s, times, float((after - before).abs().max())


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
