"""`wmctl robot serve | lerobot-eval`: the command-line front ends of `planner.serve` and `planner.lerobot_policy`
(mounted by `pipeline/cli/table.py`). Each parses its options, builds the stage's config and calls its `run_*`;
errors are `UserError`s (exit 2 under `pipeline.cli.base.WmctlGroup`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.base import AutoDevice, Sets, int_list, new_app, split_list
from pipeline.lerobot_compat import require_robot_stack
from pipeline.machine import resolve_device, with_resolved_device
from pipeline.overrides import apply_set
from pipeline.stage import UserError
from planner.cem import CEMConfig
from planner.cli_options import Ckpt, Elites, Iterations, K, Planner, Run, Samples, Seed
from planner.latent_mpc import PUSHT_GOAL_AGENT, GoalSpec, MPCConfig

log = logging.getLogger(__name__)

app = new_app("Plan for a robot through LeRobot: the async-inference server, and LeRobot's own eval harness.")

GoalImage = Annotated[list[Path] | None, typer.Option("--goal-image", help="Goal image file, one per camera of the "
                                                       "run in its camera order (repeat the option).")]
GoalState = Annotated[str | None, typer.Option(help="The goal's observation.state, comma-separated (models with "
                                               "proprioception; without it only the images count).")]
GoalDataset = Annotated[Path | None, typer.Option(help="Goal: a frame of this recorded LeRobot dataset (its root).")]
GoalEpisode = Annotated[int, typer.Option(help="With --goal-dataset: the episode.")]
GoalFrame = Annotated[int, typer.Option(help="With --goal-dataset: the frame (-1: the episode's last).")]
GoalPusht = Annotated[bool, typer.Option("--goal-pusht", help="Goal: gym-pusht's fixed goal pose, rendered once.")]
Horizon = Annotated[int, typer.Option(help="Frames planned.")]
Execute = Annotated[int, typer.Option(help="Frames executed (sent per chunk) before replanning.")]
Encoder = Annotated[Path | None, typer.Option(help="The run's encoder folder (default: where its store was "
                                              "encoded from, then its recorded name).")]


def goal_spec(goal_image: list[Path] | None, goal_state: str | None, goal_dataset: Path | None, goal_episode: int,
              goal_frame: int, goal_pusht: bool) -> GoalSpec:
    try:
        state = tuple(float(x) for x in split_list(goal_state)) if goal_state else None
    except ValueError:
        raise UserError(f"--goal-state {goal_state!r}: expected comma-separated numbers") from None
    return GoalSpec(images=tuple(goal_image or ()), state=state, dataset=goal_dataset, episode=goal_episode,
                    frame=goal_frame, pusht=goal_pusht, pusht_agent=PUSHT_GOAL_AGENT)


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    try:
        return tuple(float(x) for x in split_list(text)) if text else None
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated numbers") from None


def mpc_config(horizon: int, execute: int, planner: str, samples: int, elites: int, iterations: int,
               seed: int, context: int = 2, k: int = MPCConfig.k) -> MPCConfig:
    try:
        cem = CEMConfig(horizon=horizon, samples=samples, elites=elites, iterations=iterations)
    except ValueError as e:
        raise UserError(f"--samples/--elites/--iterations: {e}") from None
    return MPCConfig(horizon=horizon, execute=execute, context=context, planner=planner, cem=cem, seed=seed, k=k)


@app.command("serve")
def serve(
    run: Run = None, ckpt: Ckpt = None,
    goal_image: GoalImage = None, goal_state: GoalState = None, goal_dataset: GoalDataset = None,
    goal_episode: GoalEpisode = 0, goal_frame: GoalFrame = -1, goal_pusht: GoalPusht = False,
    host: Annotated[str, typer.Option(help="Address to bind: loopback unless --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (the client's --server_address).")] = 8080,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Bind beyond loopback. The protocol's "
                                               "payloads are pickles: only on a network you trust.")] = False,
    fps: Annotated[float, typer.Option(help="The robot's control rate (Hz).")] = 10.0,
    plan_ahead: Annotated[bool, typer.Option("--plan-ahead", help="Plan from the model's prediction of the state "
                                             "after the queued actions that run while the plan is computed, and "
                                             "send them again ahead of the new ones: with a plan slower than a "
                                             "chunk, the robot need not wait (pair with the client's "
                                             "--chunk_size_threshold near 1).")] = False,
    horizon: Horizon = 5, execute: Execute = 2, planner: Planner = "cem", samples: Samples = 64,
    elites: Elites = 8, iterations: Iterations = 5, k: K = MPCConfig.k, seed: Seed = 0,
    action_kind: Annotated[str, typer.Option(help="delta (end-effector displacement) | absolute (targets).")]
    = "delta",
    position_dims: Annotated[str, typer.Option(help="Action dimensions that move the end effector.")] = "0,1,2",
    state_dims: Annotated[str, typer.Option(help="observation.state dimensions of its position.")] = "0,1,2",
    delta_scale: Annotated[float, typer.Option(help="State units per delta action unit.")] = 1.0,
    workspace_low: Annotated[str | None, typer.Option(help="Workspace box low corner (default: the dataset's "
                                                      "observation.state range).")] = None,
    workspace_high: Annotated[str | None, typer.Option(help="Workspace box high corner.")] = None,
    workspace_margin: Annotated[float, typer.Option(help="Widen the dataset's box by this.")] = 0.0,
    max_step_change: Annotated[str | None, typer.Option(help="Largest change between consecutive actions, per "
                                                        "dimension (default: half the dataset's action range).")]
    = None,
    max_chunk_travel: Annotated[float | None, typer.Option(help="Largest end-effector travel per chunk.")] = None,
    obs_timeout: Annotated[float, typer.Option(help="Hold after this long without observations (s).")] = 1.0,
    deadline: Annotated[float | None, typer.Option(help="Hold instead of a plan slower than this (s).")] = None,
    no_safety: Annotated[bool, typer.Option("--no-safety", help="Send plans unclamped (simulators only).")]
    = False,
    encoder: Encoder = None, device: AutoDevice = "auto",
    duration: Annotated[float | None, typer.Option(help="Stop after this long (s; default: Ctrl-C).")] = None,
    set_: Sets = None,
) -> None:
    """Serve the run to LeRobot's async-inference RobotClient (--policy_type=wmctl) towards a goal, behind the
    safety guard (workspace box, per-step and per-chunk clamps, holds); prints the report when stopped."""
    require_robot_stack("wmctl robot serve")
    from planner.safety import SafetyConfig
    from planner.serve import ServeConfig, ServeRunConfig, run_serve
    from trainer.runs import resolve_run

    safety = SafetyConfig(
        enabled=not no_safety, action_kind=action_kind, position_dims=int_list(position_dims),
        state_dims=int_list(state_dims), delta_scale=delta_scale,
        workspace_low=_floats(workspace_low, "--workspace-low"), workspace_high=_floats(workspace_high,
                                                                                        "--workspace-high"),
        workspace_margin=workspace_margin, max_step_change=_floats(max_step_change, "--max-step-change"),
        max_chunk_travel=max_chunk_travel, obs_timeout_s=obs_timeout, deadline_s=deadline)
    cfg = ServeRunConfig(
        run=resolve_run(run, ckpt), goal=goal_spec(goal_image, goal_state, goal_dataset, goal_episode, goal_frame,
                                                   goal_pusht),
        serve=ServeConfig(host=host, port=port, allow_remote=allow_remote, fps=fps, plan_ahead=plan_ahead),
        mpc=mpc_config(horizon, execute, planner, samples, elites, iterations, seed, context=1, k=k),
        safety=safety,
        encoder=encoder, device=str(resolve_device(device)), duration_s=duration)
    typer.echo(json.dumps(run_serve(with_resolved_device(apply_set(cfg, set_, what="robot serve")))))


@app.command("lerobot-eval")
def lerobot_eval(
    run: Run = None, ckpt: Ckpt = None,
    goal_image: GoalImage = None, goal_state: GoalState = None, goal_dataset: GoalDataset = None,
    goal_episode: GoalEpisode = 0, goal_frame: GoalFrame = -1,
    goal_pusht: Annotated[bool, typer.Option("--goal-pusht/--no-goal-pusht", help="Goal: gym-pusht's fixed goal "
                                             "pose, rendered once (the default for --env pusht).")] = True,
    env: Annotated[str, typer.Option(help="LeRobot env type (--env.type): pusht | metaworld | ...")] = "pusht",
    task: Annotated[str | None, typer.Option(help="The env's task (Meta-World: e.g. reach-v3).")] = None,
    episodes: Annotated[int, typer.Option(help="LeRobot eval episodes (episode i starts from --seed + i).")] = 10,
    max_steps: Annotated[int, typer.Option(help="Env steps per episode.")] = 300,
    seed: Annotated[int, typer.Option(help="LeRobot's start seed (episode i: seed + i).")] = 1000,
    horizon: Horizon = 5, execute: Execute = 2, planner: Planner = "cem", samples: Samples = 64,
    elites: Elites = 8, iterations: Iterations = 5,
    camera_map: Annotated[list[str] | None, typer.Option(help="run_camera=observation_key (repeat).")] = None,
    action_repeat: Annotated[int, typer.Option(help="Env steps per model step (env faster than the data).")] = 1,
    encoder: Encoder = None, device: AutoDevice = "auto",
    out: Annotated[Path | None, typer.Option(help="Folder for eval_info.json.")] = None,
    set_: Sets = None,
) -> None:
    """Run the wmctl planning policy through LeRobot's own eval harness (make_env, make_policy, eval_policy_all) and
    print LeRobot's pc_success with the plan latency."""
    require_robot_stack("wmctl robot lerobot-eval")
    from planner.lerobot_policy import LerobotEvalConfig, run_lerobot_eval
    from trainer.runs import resolve_run

    pairs = []
    for item in camera_map or []:
        cam, sep, key = item.partition("=")
        if not sep or not cam or not key:
            raise UserError(f"--camera-map {item!r}: expected run_camera=observation_key")
        pairs.append((cam, key))
    pusht = goal_pusht and not (goal_image or goal_dataset)
    cfg = LerobotEvalConfig(
        run=resolve_run(run, ckpt), goal=goal_spec(goal_image, goal_state, goal_dataset, goal_episode, goal_frame,
                                                   pusht),
        env=env, task=task, episodes=episodes, max_steps=max_steps, seed=seed,
        mpc=mpc_config(horizon, execute, planner, samples, elites, iterations, seed=0),
        camera_map=tuple(pairs), action_repeat=action_repeat, encoder=encoder,
        device=str(resolve_device(device)), out=out)
    res = run_lerobot_eval(with_resolved_device(apply_set(cfg, set_, what="robot lerobot-eval")))
    overall = res["lerobot"]["overall"]
    lat = res["plan_latency_s"]
    latency = f"; plan latency p50 {lat['p50'] * 1e3:.0f} ms p95 {lat['p95'] * 1e3:.0f} ms" if lat else ""
    typer.echo(f"{res['env']}: pc_success {overall['pc_success']:.1f}% over {overall['n_episodes']} episodes "
               f"(LeRobot's metric){latency}")
    typer.echo(json.dumps({"overall": overall, "plan_latency_s": lat}))
