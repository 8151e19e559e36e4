"""The wmctl planning policy inside LeRobot: registered as a LeRobot policy type, planning in chunks, and run by
LeRobot's own evaluation harness on gym-pusht (`run_lerobot_eval`), whose info dict (`pc_success`) comes back."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from packaging.version import Version

lerobot = pytest.importorskip("lerobot")
if Version(lerobot.__version__) < Version("0.6"):
    pytest.skip("the LeRobot policy is built on lerobot 0.6 (the Python 3.12 stack)", allow_module_level=True)

from pipeline.stage import UserError  # noqa: E402
from planner.cem import CEMConfig  # noqa: E402
from planner.latent_mpc import Goal, GoalSpec, MPCConfig, Planning, load_goal  # noqa: E402
from planner.lerobot_policy import (  # noqa: E402
    LerobotEvalConfig,
    WmctlConfig,
    WmctlPolicy,
    run_lerobot_eval,
)
from trainer.actions import ActionSpace  # noqa: E402

SCALE = 100.0


class PushtAgentModel:
    """gym-pusht's agent as an analytic world model (tests/test_sim_pusht.py's): two tokens, a constant patch and
    the agent xy / SCALE; each env step moves the agent a third of the way to its relative target."""

    encoder: dict = {}
    window = 4
    state_dim = 2
    actions = ActionSpace("relative_to_state", 2, np.zeros(2), np.full(2, 24.0))
    dtype = torch.float32

    def planning_rollout(self, context_TNZ, *, context_actions_TA=None, k=4, seed=0):
        def rollout(actions_SHA, grad=False):
            S, H, _ = actions_SHA.shape
            agent = context_TNZ[-1, 1].expand(S, 2) * SCALE
            out = []
            for h in range(H):
                for j in range(self.actions.frameskip):
                    agent = agent + 0.35 * actions_SHA[:, h, 2 * j:2 * j + 2]
                out.append(torch.stack([torch.zeros(S, 2), agent / SCALE], dim=1))
            return torch.stack(out, dim=1)

        return rollout


def encode_agent(images, state):
    return torch.tensor([[0.0, 0.0], [state[0] / SCALE, state[1] / SCALE]], dtype=torch.float32)


def analytic_policy(execute=2, horizon=3, goal_xy=(300.0, 300.0)) -> WmctlPolicy:
    cfg = WmctlConfig(horizon=horizon, execute=execute, context=1, samples=32, elites=4, iterations=3,
                      device="cpu")
    planning = Planning(PushtAgentModel(), encode_agent, ["observation.image"], 96, None, "pusht")
    return WmctlPolicy(cfg, planning=planning, goal=Goal(np.zeros((1, 96, 96, 3), np.uint8), np.array(goal_xy)))


def _batch(agent_xy) -> dict[str, torch.Tensor]:
    state = torch.as_tensor(np.asarray(agent_xy, np.float64))[None]
    return {"observation.image": torch.rand(1, 3, 96, 96), "observation.state": state}


def test_wmctl_is_a_lerobot_policy_type_found_by_lerobots_factories(tmp_path):
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors

    assert get_policy_class("wmctl") is WmctlPolicy
    goal = GoalSpec(pusht=True, pusht_agent=(100.0, 120.0))
    cfg = make_policy_config("wmctl", run="/runs/r", goal=goal.to_uri(), horizon=4, device="cpu",
                             camera_map={"observation.images.front": "observation.image"})
    assert isinstance(cfg, WmctlConfig) and cfg.mpc().horizon == 4
    pre, post = make_pre_post_processors(cfg)  # LeRobot resolves make_wmctl_pre_post_processors by name
    out = pre({"observation.state": torch.zeros(2), "observation.image": torch.zeros(3, 8, 8)})
    assert out["observation.state"].shape == (1, 2)  # batched, as LeRobot's pipelines do
    assert torch.equal(post(torch.ones(1, 2)), torch.ones(1, 2))  # no (un)normalisation: the model does its own
    cfg._save_pretrained(tmp_path)  # what `policy.save_pretrained` writes: the config is the whole policy
    back = PreTrainedConfig.from_pretrained(tmp_path)
    assert isinstance(back, WmctlConfig) and back.run == "/runs/r" and back.camera_map == cfg.camera_map
    assert GoalSpec.from_uri(back.goal) == goal


def test_goal_specs_round_trip_and_bad_ones_are_refused(tmp_path):
    spec = GoalSpec(images=(tmp_path / "a.png",), state=(0.1, 0.2))
    assert GoalSpec.from_uri(spec.to_uri()) == spec
    with pytest.raises(UserError, match="exactly one of"):
        GoalSpec()
    with pytest.raises(UserError, match="exactly one of"):
        GoalSpec(pusht=True, dataset=tmp_path)
    for bad in ("goal.png", 'wmctl-goal:{"pusht": true, "mystery": 1}', "wmctl-goal:{not json"):
        with pytest.raises(UserError, match="goal"):
            GoalSpec.from_uri(bad)
    with pytest.raises(UserError, match="2 files for the run's 1 cameras"):
        load_goal(GoalSpec(images=(tmp_path / "a.png", tmp_path / "b.png")), cameras=["c"], size=64)
    (tmp_path / "a.png").write_text("not an image")
    with pytest.raises(UserError, match="a.png: cannot read it"):
        load_goal(GoalSpec(images=(tmp_path / "a.png",)), cameras=["c"], size=64)


def test_pusht_goal_is_gym_pushts_goal_pose_rendered_once():
    goal = load_goal(GoalSpec(pusht=True), cameras=["observation.image"], size=96)
    assert goal.images.shape == (1, 96, 96, 3) and goal.images.dtype == np.uint8
    assert goal.state.tolist() == [256.0, 420.0]
    from pipeline.sims.pusht import PushtSim

    sim = PushtSim(96)
    try:  # the same scene: the agent where the spec puts it, the T at gym-pusht's goal pose (256, 256, pi/4)
        assert np.array_equal(sim.reset(np.array([256.0, 420.0, 256.0, 256.0, np.pi / 4])), goal.images)
    finally:
        sim.close()


def test_goal_from_a_recorded_episode_frame(pusht_root):
    goal = load_goal(GoalSpec(dataset=pusht_root, episode=1, frame=-1), cameras=["observation.image"], size=96)
    import pandas as pd

    table = pd.concat(pd.read_parquet(p) for p in sorted(pusht_root.glob("data/*/*.parquet")))
    last = table[table.episode_index == 1].sort_values("frame_index").iloc[-1]
    assert goal.images.shape == (1, 96, 96, 3) and np.allclose(goal.state, last["observation.state"])
    with pytest.raises(UserError, match="lacks the run's cameras"):
        load_goal(GoalSpec(dataset=pusht_root, episode=1), cameras=["observation.images.wrist"], size=96)
    with pytest.raises(UserError, match="--goal-frame 99"):
        load_goal(GoalSpec(dataset=pusht_root, episode=1, frame=99), cameras=["observation.image"], size=96)


def test_select_action_plans_executes_a_chunk_then_replans_and_reset_clears_the_plan():
    policy = analytic_policy(execute=2, horizon=3)
    agent = np.array([100.0, 100.0])
    for _ in range(5):  # frameskip 2, execute 2: one plan per 4 env steps
        a = policy.select_action(_batch(agent)).numpy()[0]
        assert a.shape == (2,)
        agent = agent + 0.35 * (a - agent)  # gym-pusht's first PD step towards the absolute target
    assert len(policy.episode_latencies[-1]) == 2 and policy.mpc.plans == 2
    assert np.linalg.norm(agent - [300.0, 300.0]) < np.linalg.norm([200.0, 200.0])  # heading to the goal
    assert policy.mpc.plan_mean is not None
    policy.reset()
    assert policy.mpc.plan_mean is None and not policy._frames and policy.episode_latencies[-1] == []
    chunk = policy.predict_action_chunk(_batch(agent))
    assert chunk.shape == (1, 4, 2)  # execute 2 frames x frameskip 2 env steps
    with pytest.raises(UserError, match="batch_size=1"):
        policy.select_action({"observation.image": torch.rand(2, 3, 96, 96), "observation.state": torch.zeros(2, 2)})


def test_action_repeat_holds_each_model_step_for_that_many_env_steps():
    policy = analytic_policy(execute=1, horizon=2)
    policy.config.action_repeat = 3
    acts = [policy.select_action(_batch([100.0, 100.0])).numpy()[0] for _ in range(6)]
    assert all(np.array_equal(acts[0], a) for a in acts[:3]) and all(np.array_equal(acts[3], a) for a in acts[3:])
    assert policy.mpc.plans == 1  # 2 model steps (one frame) x 3 repeats


def test_run_lerobot_eval_on_pusht_reports_lerobots_own_success_rate(tiny_run, tmp_path, monkeypatch):
    import lerobot.scripts.lerobot_eval as lerobot_eval

    calls = {"rollouts": 0, "info": None}
    real_all, real_rollout = lerobot_eval.eval_policy_all, lerobot_eval.rollout

    def spy_all(*a, **kw):
        calls["info"] = real_all(*a, **kw)
        return calls["info"]

    def spy_rollout(*a, **kw):
        calls["rollouts"] += 1
        return real_rollout(*a, **kw)

    monkeypatch.setattr(lerobot_eval, "eval_policy_all", spy_all)
    monkeypatch.setattr(lerobot_eval, "rollout", spy_rollout)
    cfg = LerobotEvalConfig(run=tiny_run, episodes=2, max_steps=8, seed=7, out=tmp_path,
                            mpc=MPCConfig(horizon=2, execute=2, context=2, k=2,
                                          cem=CEMConfig(samples=8, elites=2, iterations=2)))
    res = run_lerobot_eval(cfg)
    info = res["lerobot"]
    assert info is calls["info"] and calls["rollouts"] == 2  # LeRobot's harness ran both episodes
    overall = info["overall"]
    assert {"avg_sum_reward", "avg_max_reward", "pc_success", "n_episodes", "eval_s"} <= set(overall)
    assert overall["n_episodes"] == 2 and 0.0 <= overall["pc_success"] <= 100.0
    assert [t["metrics"]["successes"] for t in info["per_task"]][0] in ([False, False], [True, False],
                                                                         [False, True], [True, True])
    lat = res["plan_latency_s"]
    assert lat["plans"] == 2 * 4 and lat["p50"] > 0 and len(res["per_episode_latency_s"]) == 2  # 8 steps / 2 each
    saved = json.loads((tmp_path / "eval_info.json").read_text())
    assert saved["lerobot"]["overall"]["n_episodes"] == 2
    with pytest.raises(UserError, match="--env nosuchenv"):
        run_lerobot_eval(dataclasses.replace(cfg, env="nosuchenv"))


def test_the_lerobot_eval_command_prints_lerobots_success_rate(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app  # as mounted: `wmctl robot lerobot-eval`

    r = CliRunner().invoke(app, ["robot", "lerobot-eval", "--run", str(tiny_run), "--episodes", "1", "--max-steps", "4",
                                 "--horizon", "2", "--samples", "8", "--elites", "2", "--iterations", "1",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "pusht: pc_success" in r.output and "LeRobot's metric" in r.output
    assert json.loads(r.output[r.output.rindex('{"overall"'):])["overall"]["n_episodes"] == 1
    r = CliRunner().invoke(app, ["robot", "lerobot-eval", "--run", str(tiny_run), "--camera-map", "nonsense"])
    assert r.exit_code == 2 and "--camera-map 'nonsense'" in r.output
