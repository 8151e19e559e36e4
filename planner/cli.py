"""The planner stage's commands: the `plan` group (offline, sim, compare: goal-conditioned MPC in latent space, on
held-out episodes and in a simulator, and two planners compared trial by trial) and `bench plan`. The planners know
the world model only through `planner.core.WorldModel`; these commands load one from a run (`trainer.api`). Mounted
by name from `pipeline.cli.table`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from featurestore.reader import TokenReader
from pipeline.cli.base import AutoDevice, Sets, console, given_options, hxw, new_app, split_list
from pipeline.cli.progress import progress
from pipeline.machine import resolve_device, with_resolved_device
from pipeline.overrides import apply_set
from pipeline.stage import UserError, atomic_write_json
from planner.bench import BenchCase, bench_plan
from planner.cem import CEMConfig
from planner.cli_options import Ckpt, Elites, Iterations, K, Planner, Run, Samples, Seed
from planner.offline import OfflineConfig, run_plan_offline
from planner.planners import PLANNERS, search_configs
from planner.progress import SimStopped
from planner.results import SimResult, compare_sims, load_sim_result
from planner.sim import PROTOCOLS, SWM_CEM, SimConfig, run_plan_sim
from trainer.api import LoadedWorldModel, inference_dtype
from trainer.checkpoint import resolve_checkpoint
from trainer.runs import check_writable, plan_dir, resolve_run

app = new_app("Goal-conditioned MPC in latent space (CEM or gradient).")

StateWeight = Annotated[float, typer.Option(help="Weight of the state distance (models with proprio).")]
Precision = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32: the planning "
                                      "model's weights and rollouts (bf16 also pays on CPUs with AVX512-BF16/AMX).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model's rollouts (the first plan "
                                       "compiles: tens of seconds on CPU).")]
Graph = Annotated[bool, typer.Option("--graph", help="Replay the planner's rollouts as CUDA graphs (CUDA only; "
                                      "one capture per rollout shape, reused every MPC step).")]
Cem = Annotated[str, typer.Option("--cem", help="CEM budget: default | dinowm (300x30, 30 iterations) | icem "
                                  "(coloured noise, elites kept) | fast (the best success per ms measured: today "
                                  "icem's); --samples/--elites/--iterations given win.")]

# `plan sim`'s own options (its command would otherwise pass 60 lines of declarations)
SimEnv = Annotated[str, typer.Option(help="auto (the one the dataset was recorded in) | pusht | metaworld-reach | "
                                     "metaworld-push.")]
Trials = Annotated[int, typer.Option(help="Closed-loop trials (starts drawn from held-out episodes), each run by "
                                    "every policy.")]
SimGoalOffset = Annotated[int, typer.Option(help="Goal: env steps (not model frames) replayed from the start.")]
MaxSteps = Annotated[int, typer.Option(help="MPC env steps per trial.")]
Horizon = Annotated[int, typer.Option(help="Planning horizon (model frames).")]
Execute = Annotated[int, typer.Option(help="Model frames executed per plan.")]
ExecutePlan = Annotated[str, typer.Option(help="best: the best sequence found | mean: the final CEM mean.")]
Shift = Annotated[str, typer.Option(help="none | lighting | background.")]
CostFrames = Annotated[str, typer.Option(help="all: goal distance averaged over the planned frames; last: "
                                         "the last frame only.")]
NoiseDraws = Annotated[int, typer.Option(help="Score each candidate by its mean cost over this many independent "
                                         "sampling-noise draws (1: one draw shared by all).")]
Protocol = Annotated[str, typer.Option(help="gym (wmctl's: goal 15 env steps ahead, 30 steps) | swm "
                                       "(stable-worldmodel's PushT protocol: goal 25 ahead, 50 steps, plans of 5 "
                                       "frames at frameskip 5 all executed, CEM 300x30 unless a budget is given).")]
SuccessRule = Annotated[str, typer.Option(help="Meta-World: metaworld (its own success flag) | strict (also the "
                                          "arm within 10 cm of the goal's).")]
SimOut = Annotated[Path | None, typer.Option(help="Output folder (default: <run>/plan/sim_<planner>_<shift>, "
                                             "sim_swm_... under --protocol swm; an earlier result of another "
                                             "configuration there is kept beside it).")]


def _protocol_task(ctx: typer.Context, protocol: str, **task: int) -> dict[str, int]:
    """The trial settings of `--protocol`: its own values for the options left at their defaults (a given one that
    differs is refused by SimConfig)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    given = given_options(ctx)
    return {k: v if k in given else PROTOCOLS[protocol].get(k, v) for k, v in task.items()}


def _search(ctx: typer.Context | None, planner: str, preset: str, horizon: int, **budget: int):
    given = given_options(ctx) if ctx is not None else set(budget)
    return search_configs(planner, horizon, preset, **{k: v for k, v in budget.items()
                                                       if k in given or preset == "default"})


@app.command("offline")
def plan_offline(
    ctx: typer.Context,
    run: Run = None,
    ckpt: Ckpt = None,
    store: Annotated[Path | None, typer.Option(help="Token store (default: the run's).")] = None,
    goal_offset: Annotated[int, typer.Option(help="Goal H model frames after the start (H x frameskip recorded "
                                             "steps; also the planning horizon).")] = OfflineConfig.goal_offset,
    planner: Planner = OfflineConfig.planner,
    samples: Samples = CEMConfig.samples,
    elites: Elites = CEMConfig.elites,
    iterations: Annotated[int, typer.Option(help="CEM iterations (GD: 4x).")] = CEMConfig.iterations,
    cem: Cem = "default",
    episodes: Annotated[int | None, typer.Option(help="Held-out (val) episodes planned on: at most N (up to 2 "
                                                 "problems each; default all).")] = None,
    state_weight: StateWeight = OfflineConfig.state_weight,
    k: K = OfflineConfig.k,
    seed: Seed = OfflineConfig.seed,
    judge: Annotated[Path | None, typer.Option(help="Another run/checkpoint that scores the plans too (same "
                                                   "action space), next to the planning model's own score.")] = None,
    device: AutoDevice = "auto",
    compile: Compile = False,
    graph: Graph = False,
    precision: Precision = "auto",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <run>/plan): offline_<planner>.json is "
                                             "written there, nothing into the run.")] = None,
    set_: Sets = None,
) -> None:
    """Plan from frame t to the encoded frame t+H on labelled val episodes; compare with GT and random actions,
    scored by the planning model (its optimisation noise, and fresh noise) and by --judge."""
    path, device = resolve_run(run, ckpt), str(resolve_device(device))
    out = check_writable(out or plan_dir(resolve_checkpoint(path)), "the plan output folder",
                         "pass --out DIR (a folder you can write; nothing is then written into the run)")
    wm = LoadedWorldModel.load(path, device=device, compile=compile, precision=precision, graphs=graph)
    judge_wm = (LoadedWorldModel.load(resolve_run(judge, None), device=device, precision=precision)
                if judge is not None else None)
    cem_cfg, gd = _search(ctx, planner, cem, goal_offset, samples=samples, elites=elites, iterations=iterations)
    cfg = OfflineConfig(goal_offset=goal_offset, planner=planner, cem=cem_cfg, gd=gd, episodes=episodes, seed=seed,
                        state_weight=state_weight, k=k, judge=judge_wm, out=out)
    cfg = apply_set(cfg, set_, what="plan offline")
    with progress("plan offline", total=None, unit="problems") as advance:
        res = run_plan_offline(wm, TokenReader(store or wm.store), cfg, on_total=advance.set_total,
                               on_progress=advance)
    typer.echo(f"{res.problems} problems, goal {cfg.goal_offset} frames ahead, {cfg.planner}; latent distance to goal "
               f"(plan | ground-truth actions | random mean, best of {res.random_samples}; plan closer than "
               "random):")
    for scorer, d in res.latent_distance.items():
        who = {"model_same_noise": "planning model, the noise it optimised on",
               "model_fresh_noise": "planning model, fresh noise", "judge": f"judge {res.judge}"}[scorer]
        typer.echo(f"  {who}: {d['plan']:.4f} | {d['ground_truth']:.4f} | {d['random_mean']:.4f}, "
                   f"{d['random_best']:.4f}; {100 * res.plan_closer_than_random[scorer]:.0f}%")
    typer.echo(f"action error vs GT (std units) plan {res.action_error_vs_ground_truth['plan']:.3f} "
               f"random {res.action_error_vs_ground_truth['random']:.3f}; "
               f"latency p50 {res.latency_s.p50 * 1000:.0f} ms. Wrote {res.out}")


@app.command("sim")
def plan_sim(
    ctx: typer.Context,
    run: Run = None,
    ckpt: Ckpt = None,
    env: SimEnv = SimConfig.env,
    episodes: Trials = SimConfig.trials,
    goal_offset: SimGoalOffset = SimConfig.goal_offset,
    max_steps: MaxSteps = SimConfig.max_steps,
    horizon: Horizon = SimConfig.horizon,
    execute: Execute = SimConfig.execute,
    planner: Planner = SimConfig.planner,
    samples: Samples = CEMConfig.samples,
    elites: Elites = CEMConfig.elites,
    iterations: Iterations = CEMConfig.iterations,
    cem: Cem = "default",
    execute_plan: ExecutePlan = SimConfig.execute_plan,
    shift: Shift = SimConfig.shift,
    state_weight: StateWeight = SimConfig.state_weight,
    k: K = SimConfig.k,
    cost_frames: CostFrames = SimConfig.cost_frames,
    seed: Seed = SimConfig.seed,
    device: AutoDevice = "auto",
    compile: Compile = False,
    graph: Graph = False,
    precision: Precision = "auto",
    noise_draws: NoiseDraws = 1,
    protocol: Protocol = "gym",
    success_rule: SuccessRule = SimConfig.success_rule,
    serve_fps: Annotated[int, typer.Option(help="> 0: run the model's trials through `wmctl robot serve` and "
                                           "LeRobot's RobotClient with the simulator as a robot at this control "
                                           "rate (Hz): the next chunk is planned while the robot executes; the "
                                           "loop's rate is the sustained action rate.")] = 0,
    serve_threshold: Annotated[float, typer.Option(help="With --serve-fps: the client's --chunk_size_threshold "
                                                 "(send an observation when the queue is at most this share of "
                                                 "a chunk).")] = 0.5,
    serve_plan_ahead: Annotated[bool, typer.Option("--serve-plan-ahead", help="With --serve-fps: the server's "
                                                   "--plan-ahead.")] = False,
    out: SimOut = None,
    set_: Sets = None,
) -> None:
    """Closed-loop MPC in a simulator (gym-pusht, Meta-World) towards goals from held-out episodes; random actions
    (and Meta-World's scripted controller, the upper bound) alongside. Finished trials are kept as they finish: after
    a SIGTERM (exit 3) or a kill, the same command continues after them."""
    device = str(resolve_device(device))  # the device itself (sim.json records it): cpu or cuda, never auto
    task = _protocol_task(ctx, protocol, goal_offset=goal_offset, max_steps=max_steps, horizon=horizon,
                          execute=execute)
    budget = {"samples": samples, "elites": elites, "iterations": iterations}
    if protocol == "swm" and cem == "default" and not set(budget) & given_options(ctx):
        budget = dict(SWM_CEM)  # the published budget, unless the user states the one the machine affords
        ctx = None  # every budget value is given
    cem_cfg, gd = _search(ctx, planner, cem, task["horizon"], **budget)
    cfg = SimConfig(trials=episodes, **task, planner=planner, cem=cem_cfg, gd=gd, shift=shift, seed=seed,
                    state_weight=state_weight, k=k, cost_frames=cost_frames, env=env, device=device,
                    execute_plan=execute_plan, protocol=protocol, success_rule=success_rule, noise_draws=noise_draws,
                    serve_fps=serve_fps, serve_threshold=serve_threshold, serve_plan_ahead=serve_plan_ahead)
    cfg = with_resolved_device(apply_set(cfg, set_, what="plan sim"))  # `--set device=...` too
    wm = LoadedWorldModel.load(resolve_run(run, ckpt), device=cfg.device, compile=compile, precision=precision,
                               graphs=graph)
    protocol, planner, shift = cfg.protocol, cfg.planner, cfg.shift
    out = out or cfg.out or \
        plan_dir(wm.checkpoint) / f"sim_{'' if protocol == 'gym' else protocol + '_'}{planner}_{shift}"
    try:
        with progress("plan sim", total=None, unit="trials") as advance:
            res = run_plan_sim(wm, dataclasses.replace(cfg, out=out), store=wm.store, on_total=advance.set_total,
                               on_progress=advance, serve=_served_loop() if cfg.serve_fps else None)
    except SimStopped as e:  # SIGTERM: the finished trials are kept, the same command continues
        typer.secho(str(e), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(3) from None
    _sim_summary(res, out)


def _served_loop():
    """`plan sim --serve-fps`: the served loop's factory (LeRobot's robot stack, refused on the old one)."""
    from pipeline.lerobot_compat import require_robot_stack

    require_robot_stack("wmctl plan sim --serve-fps")
    from planner.simrobot import served_loop

    return served_loop


def _sim_summary(res: SimResult, out: Path) -> None:
    typer.echo(f"{res.env}, cameras {', '.join(res.cameras)}:")
    for policy, r in res.policies.items():
        lat = f", plan latency p50 {r.latency_s.p50 * 1000:.0f} ms p95 {r.latency_s.p95 * 1000:.0f} ms" \
            if r.latency_s else ""
        reached = f" (in {r.steps_to_success:.0f} env steps on average)" if r.steps_to_success else ""
        if r.action_hz is not None:  # the control loop: simulator, rendering, encoding and planning
            lat += f", loop {r.action_hz:.1f} env steps/s"
        dists = ", ".join(f"{k.removeprefix('final_')} {v:.3g} (start {r.distances['start_' + k[6:]]:.3g})"
                          for k, v in r.distances.items() if k.startswith("final_"))
        typer.echo(f"{policy:>8}: success {100 * r.success_rate:.0f}% of {res.trials}{reached}; final {dists}; "
                   f"action smoothness {r.smoothness:.2f}{lat}")
        if r.by_group and list(r.by_group) != ["unknown"]:
            per = "; ".join(f"{g} {v['successes']}/{v['trials']}" for g, v in r.by_group.items())
            typer.echo(f"          by goal: {per}  (push: the object must move; agent: the robot alone can meet it)")
    typer.echo(f"wrote {out}/sim.json" + "".join(f", {p}" for p in res.strips or []))


@app.command("compare")
def plan_compare(
    a: Annotated[list[Path], typer.Option("--a", help="A's `plan sim` output (folder or sim.json); repeat for more "
                                          "pairs (one per model seed or trial set), the i-th --a with the i-th --b.")],
    b: Annotated[list[Path], typer.Option("--b", help="B's, on the same trials as the --a it pairs with.")],
    names: Annotated[str, typer.Option(help="Labels of A and B.")] = "A,B",
    policy: Annotated[str, typer.Option(help="model | random | scripted: whose outcomes to compare.")] = "model",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the comparison as JSON here.")] = None,
) -> None:
    """Two planners trial by trial on the same `plan sim` trials: successes, the trials only one of them solves
    with the exact McNemar p-value of that split, and which ends closer to the goal; pairs are pooled."""
    if len(a) != len(b):
        raise UserError(f"{len(a)} --a against {len(b)} --b: give one --b per --a (the i-th pairs with the i-th)")
    label_a, _, label_b = names.partition(",")
    if not label_b:
        raise UserError(f"--names {names!r}: two labels, comma-separated (e.g. recipe,baseline)")
    pairs = [(load_sim_result(x), load_sim_result(y)) for x, y in zip(a, b)]
    if any(policy not in r.policies for pair in pairs for r in pair):
        raise UserError(f"--policy {policy!r}: not in every result (model and random are; scripted only in Meta-World)")
    res = compare_sims(pairs, policy)
    n = res["trials"]
    typer.echo(f"{label_a} vs {label_b}: {n} trials in {res['pairs']} pair(s) ({pairs[0][0].env}, {policy})")
    typer.echo(f"  success: {label_a} {res['success_a']}/{n}, {label_b} {res['success_b']}/{n}; both {res['both']}, "
               f"only {label_a} {res['only_a']}, only {label_b} {res['only_b']} "
               f"(exact McNemar p = {res['mcnemar_p']:.3g})")
    for g, c in res.get("by_group", {}).items():
        typer.echo(f"  {g} trials: {label_a} {c['success_a']}/{c['trials']}, {label_b} {c['success_b']}/{c['trials']}; "
                   f"only {label_a} {c['only_a']}, only {label_b} {c['only_b']} (p = {c['mcnemar_p']:.3g})")
    for key, d in res["distances"].items():
        typer.echo(f"  {key.removeprefix('final_')} at the end: {label_a} {d['mean_a']:.3g}, {label_b} "
                   f"{d['mean_b']:.3g} ({label_a} closer in {d['a_closer']}, {label_b} in {d['b_closer']})")
    if json_out is not None:
        atomic_write_json(json_out, {"a": [str(x) for x in a], "b": [str(y) for y in b], "names": [label_a, label_b],
                                     "policy": policy, **res})
        typer.echo(f"wrote {json_out}")


def bench_plan_cmd(
    presets: Annotated[str, typer.Option(help="Comma-separated model presets.")] = "tiny,small,base",
    samples: Samples = 64,
    iterations: Annotated[int, typer.Option(help="CEM iterations.")] = 5,
    horizon: Annotated[int, typer.Option(help="Planning horizon (frames).")] = 5,
    grid: Annotated[str, typer.Option(help="Token grid per frame, HxW.")] = "6x6",
    enc_dim: Annotated[int, typer.Option(help="Token width.")] = 32,
    device: AutoDevice = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="Also time it torch.compiled, side by side.")] = False,
    graph: Annotated[bool, typer.Option("--graph", help="Also time the rollouts replayed as CUDA graphs, side by "
                                        "side (CUDA only).")] = False,
    cem: Annotated[str, typer.Option("--cem", help="default | dinowm | icem | fast: the budget's other settings "
                                     "(noise, kept elites); --samples and --iterations as given.")] = "default",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32, as `plan`'s.")
                         ] = "auto",
    planners: Annotated[str, typer.Option(help="Comma-separated planners, one row each per preset: cem | "
                                          "cem+proposal | proposal (a freshly initialised proposal: timing does not "
                                          "depend on its weights).")] = "cem",
) -> None:
    """Milliseconds per MPC step (one CEM optimisation) and model evaluations per step, per preset."""
    names = _bench_planners(planners)
    dev = resolve_device(device)
    if graph and dev.type != "cuda":
        raise UserError(f"--graph times CUDA graphs and this run is on {dev}: run it on a GPU (--device cuda), "
                        "or drop --graph (--compile is the CPU's option)")
    dtype = inference_dtype(precision, dev)
    cases = [_fresh_case(p, hxw(grid, "--grid", "6x6 or 16x16"), enc_dim, dev, dtype) for p in split_list(presets)]
    result = bench_plan(cases, samples=samples, iterations=iterations, horizon=horizon, device=dev,
                        compile_fn=LoadedWorldModel.compile if compile else None,
                        cem=None if cem == "default" else search_configs("cem", horizon, cem)[0], graph=graph,
                        planners=names)
    _plan_table(result, samples, iterations, horizon, compile, graph, by_planner=names != ("cem",))


def _bench_planners(text: str) -> tuple[str, ...]:
    """`--planners`' names, checked against the registry (gd is not timed: bench plan times one CEM budget, and the
    planners that take the proposal)."""
    choices = [n for n, p in PLANNERS.items() if not p.grad]
    names = tuple(split_list(text))
    for name in names or ("",):
        if name not in choices:
            why = " (bench plan does not time gd)" if name in PLANNERS else ""
            raise UserError(f"--planners {name!r}{why}: choose from {', '.join(choices)} (comma-separated)")
    return names


def _fresh_case(preset: str, grid: tuple[int, int], enc_dim: int, dev: torch.device, dtype: torch.dtype
                ) -> BenchCase:
    wm = LoadedWorldModel.fresh(preset, grid=grid, enc_dim=enc_dim, action_dim=2, device=str(dev), dtype=dtype)
    return BenchCase(preset, wm, (wm.shape.latent_tokens, wm.shape.enc_dim), wm.params_M, dtype)


def _plan_table(result: dict, samples: int, iterations: int, horizon: int, compile: bool, graph: bool = False,
                by_planner: bool = False) -> None:
    from rich.table import Table

    table = Table(title=f"plan: CEM {samples}x{iterations}, horizon {horizon}, {result['device']} ({result['cpu']})")
    cols = ["preset", *(["planner"] if by_planner else []), "params (M)", "dtype", "ms / MPC step",
            "model evals / step", "passes / iteration"]
    cols += ["compiled ms / step", "speedup", "compile s"] if compile else []
    for col in cols + (["graph ms / step", "speedup", "capture s"] if graph else []):
        table.add_column(col)
    for r in result["rows"]:
        cells = [r["preset"], *([r["planner"]] if by_planner else []), f"{r['params_M']:.2f}", r["dtype"],
                 f"{r['ms_per_mpc_step']:.0f}", str(r["model_evals_per_step"]), f"{r['model_passes_per_iteration']:g}"]
        if compile:
            cells += [f"{r['ms_per_mpc_step_compiled']:.0f}", f"{r['compile_speedup']:.2f}x", f"{r['compile_s']:.0f}"]
        if graph and "graph_error" in r:
            cells += [r["graph_error"][:60], "", ""]
        elif graph:
            cells += [f"{r['ms_per_mpc_step_graph']:.1f}", f"{r['graph_speedup']:.2f}x", f"{r['capture_s']:.1f}"]
        table.add_row(*cells)
    console().print(table)
    typer.echo(json.dumps(result))
