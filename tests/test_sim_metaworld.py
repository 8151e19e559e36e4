"""Meta-World behind the simulator interface: exact state restore, the dataset `wmctl data metaworld` writes (read
back through lerobot), and a tiny model closing the loop with two cameras (`wmctl plan sim --env metaworld-reach`)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.sims import ENV_STATE_KEY
from pipeline.sims.metaworld import MetaWorldSim, frame_skip_for, require_egl
from pipeline.stage import UserError

KEYS = ["observation.images.exterior", "observation.images.wrist"]


def _actions(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 4))


def test_saved_state_continues_bit_exactly_in_another_instance():
    a, b = MetaWorldSim("push", 64, fps=20), MetaWorldSim("push", 64, fps=20, seed=7)
    try:
        a.new_episode(3)
        for act in _actions(5, 1):
            a.step(act)
        saved = a.state()
        run_a = [(a.step(act), a.state()) for act in _actions(8, 2)]
        assert not np.array_equal(run_a[-1][1], saved)  # the arm moved
        b.reset(saved)
        assert np.array_equal(b.state(), saved)
        run_b = [(b.step(act), b.state()) for act in _actions(8, 2)]
        for (img_a, st_a), (img_b, st_b) in zip(run_a, run_b):
            assert np.array_equal(st_a, st_b) and np.array_equal(img_a, img_b)
        assert run_a[0][0].shape == (2, 64, 64, 3)
        # Meta-World's own save (qpos/qvel only) does not continue the same way: that is why the full state is kept
        a.reset(saved)
        qpos_qvel = a.env.get_env_state()
        b.step(_actions(1, 3)[0])
        b.env.set_env_state(qpos_qvel)
        drift = [b.step(act) for act in _actions(8, 2)]
        assert not all(np.array_equal(x, y[0]) for x, y in zip(drift, run_a))
    finally:
        a.close()
        b.close()


def test_a_step_nobody_looks_at_is_not_rendered_and_the_loop_renders_one_image_per_model_frame():
    import types

    from planner.core import ActionSpec
    from planner.sim import SimConfig, Trial, run_trial
    from trainer.actions import ActionSpace

    a, b = MetaWorldSim("reach", 64, fps=20), MetaWorldSim("reach", 64, fps=20)
    try:
        a.new_episode(2)
        start = a.state()
        b.reset(start)
        acts = _actions(6, 4)
        seen = [a.step(act) for act in acts]  # every step rendered
        unseen = [b.step(act, render=False) for act in acts]
        assert all(x is None for x in unseen)  # no image made ...
        assert np.array_equal(a.state(), b.state())  # ... and the physics the same as with one
        assert np.array_equal(seen[-1], b.render())

        renders = []
        real_render = b.render
        b.render = lambda: renders.append(1) or real_render()  # count what the loop renders
        wm = types.SimpleNamespace(actions=ActionSpace("absolute", 2, np.zeros(4), np.ones(4)))
        trial = Trial(episode=0, start=0, env_state=start, actions=acts[:3])
        cfg = SimConfig(goal_offset=3, max_steps=8, horizon=2, execute=2)
        out = run_trial(b, wm, None, trial, cfg, ActionSpec(low=(-1.0,) * 8, high=(1.0,) * 8), "random",
                        np.random.default_rng(0))
        frames = len(out["frames"])  # the start, then one per model frame executed
        assert out["steps"] == 2 * (frames - 1) and frames >= 2
        # the goal: its reset and its last replayed step; the trial: its reset and one render per model frame
        assert len(renders) == 2 + 1 + (frames - 1)
    finally:
        a.close()
        b.close()


def test_rates_and_headless_rendering_are_checked(monkeypatch):
    assert frame_skip_for(20) == 20 and frame_skip_for(80) == 5
    with pytest.raises(UserError, match="valid rates.*20"):
        frame_skip_for(15)
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(UserError, match="libegl1 libegl-mesa0 libgl1-mesa-dri"):
        require_egl()


def test_dataset_reads_back_frame_exact_through_lerobot(metaworld_root):
    from pipeline.lerobot_compat import dataset_classes

    LeRobotDataset = dataset_classes()[0]
    ds = LeRobotDataset("local/metaworld-reach", root=metaworld_root, video_backend="pyav")
    assert ds.meta.fps == 20 and ds.meta.total_episodes == 6 and len(ds) == 96
    assert all(k in ds.meta.features for k in [*KEYS, "observation.state", ENV_STATE_KEY, "action"])
    assert ds.meta.features[ENV_STATE_KEY]["dtype"] == "float64"
    table = pd.concat(pd.read_parquet(p) for p in sorted(metaworld_root.glob("data/*/*.parquet")))
    states = np.stack(table[ENV_STATE_KEY].to_numpy())
    assert states.dtype == np.float64
    sim = MetaWorldSim("reach", 64, fps=20, camera_keys=KEYS)
    try:
        renders = [sim.reset(s) for s in states]  # the frames, re-rendered from the recorded simulator states
        for i in [0, 1, 7, 15, 16, 40, 95]:
            item = ds[i]
            assert np.allclose(item["action"].numpy(), table["action"].iloc[i], atol=0)
            sim.reset(states[i])
            assert np.allclose(sim.robot_state(), item["observation.state"].numpy(), atol=1e-6)
            for c, key in enumerate(KEYS):
                decoded = item[key].permute(1, 2, 0).numpy() * 255.0
                err = [np.abs(decoded - r[c]).mean() for r in renders]
                assert err[i] < 8.0, (i, key, err[i])  # AV1 is lossy; the right frame is close
                # ... and closer than any other frame of the episode that looks different
                ep = slice(16 * (i // 16), 16 * (i // 16) + 16)
                others = [e for j, e in enumerate(err[ep], start=ep.start)
                          if j != i and np.abs(renders[j][c].astype(float) - renders[i][c]).mean() > 2 * err[i]]
                assert all(e > err[i] for e in others), (i, key)
    finally:
        sim.close()


@pytest.mark.slow
def test_plan_sim_metaworld_reach_two_trials_with_two_cameras(metaworld_root, tiny_encoder, tmp_path):
    from featurestore.encode import EncodeConfig, run_encode
    from featurestore.encoders import Preprocess
    from pipeline.ingest import run_ingest
    from pipeline.ingest_config import IngestConfig
    from trainer.config import tiny
    from trainer.loop import run_train

    manifest = tmp_path / "reach.parquet"
    run_ingest(IngestConfig(source="reach", root=metaworld_root, repo_id="local/metaworld-reach", out=manifest,
                            val_fraction=0.34))
    store = tmp_path / "tokens.zarr"
    run_encode(EncodeConfig(manifest=manifest, store=store, encoder=str(tiny_encoder),
                            preprocess=Preprocess(height=64, width=64), batch_size=16, threads=1))
    run = run_train(dataclasses.replace(tiny(), store=store, out=tmp_path / "run", steps=5, proprio=True,
                                        action_mode="absolute", context_frames=4)).run_dir
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(run), "--episodes", "2", "--goal-offset", "6",
                                 "--max-steps", "4", "--horizon", "2", "--execute", "1", "--samples", "8",
                                 "--elites", "2", "--iterations", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "plan" / "sim_cem_none" / "sim.json").read_text())
    assert res["env"] == "metaworld-reach" and res["cameras"] == KEYS and res["trials"] == 2
    assert res["simulator"]["fps"] == 20 and res["simulator"]["frame_skip"] == 20
    for policy in ("model", "random", "scripted"):
        p = res[policy]
        assert 0.0 <= p["success_rate"] <= 1.0 and p["final_eef_dist"] >= 0 and p["start_eef_dist"] > 0.05
    assert res["model"]["latency_s"]["p50"] > 0 and res["scripted"]["latency_s"] is None
    for policy in ("model", "random", "scripted"):  # the control loop's rate: env steps over the loop's seconds
        trials = res[policy]["per_trial"]
        assert all(t["loop_s"] > 0 for t in trials)
        hz = sum(t["steps"] for t in trials) / sum(t["loop_s"] for t in trials)
        assert res[policy]["action_hz"] == pytest.approx(hz)
    assert f"loop {res['model']['action_hz']:.1f} env steps/s" in r.output
    assert "metaworld-reach, cameras observation.images.exterior, observation.images.wrist" in r.output
    _served_trials_match_the_synchronous_ones(run, res, tmp_path / "served")
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(run), "--env", "pusht"])
    assert r.exit_code == 2 and "recorded in metaworld-reach" in r.output


def _served_trials_match_the_synchronous_ones(run, res, out) -> None:
    """--serve-fps: the same trials through `wmctl robot serve` (a separate process) and LeRobot's unmodified
    RobotClient with the simulator as the robot, at 20 Hz, planning ahead: every trial stays in its step budget, the
    server's report comes back (printed by the server process as it exits on the run's end: plans made, chunks
    sent), the planning settings reach the server, and the client's log stays off the console."""
    pytest.importorskip("lerobot.async_inference")
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(run), "--episodes", "2", "--goal-offset", "6",
                                 "--max-steps", "4", "--horizon", "2", "--execute", "1", "--samples", "8",
                                 "--elites", "2", "--iterations", "2", "--serve-fps", "20", "--serve-threshold", "1",
                                 "--serve-plan-ahead", "--out", str(out)])
    assert r.exit_code == 0, r.output
    served = json.loads((out / "sim.json").read_text())
    same = [(t["episode"], t["start"]) for t in res["model"]["per_trial"]]
    assert [(t["episode"], t["start"]) for t in served["model"]["per_trial"]] == same
    assert served["config"]["serve_fps"] == 20 and served["served"]["plan_ahead"] is True
    report = served["served"]["server"]
    assert report["plans"] >= 2 and report["chunks"] >= report["plans"] and report["refused"] == 0
    assert served["served"]["trials_in_report"] == 2 and served["served"]["context"] == 1
    command = (out / "serve.log").read_text().splitlines()[0]  # the server's command line, as run
    assert "robot serve" in command and "--set mpc.state_weight=1.0" in command and "--plan-ahead" in command
    assert all(0 < t["steps"] <= 4 and t["loop_s"] > 0 for t in served["model"]["per_trial"])
    outcome = [(t["success"], t["final_eef_dist"]) for t in res["random"]["per_trial"]]  # untouched by serving
    assert [(t["success"], t["final_eef_dist"]) for t in served["random"]["per_trial"]] == outcome
    assert "robot_client" not in r.output and (out / "client.log").stat().st_size > 0
    assert (out / "serve.log").is_file()


def test_push_success_is_metaworlds_own_flag_and_the_old_rule_is_the_stricter_option():
    """Meta-World's `info["success"]` (its evaluate_state, the env's target set to the goal's object) judges a push
    by the puck alone: an arm that pushed the puck home and then moved away succeeds; the old rule, kept as
    `success_rule="strict"`, also demands the arm within 10 cm of the goal's arm pose."""
    sim = MetaWorldSim("push", 64, fps=20)
    strict = MetaWorldSim("push", 64, fps=20, success_rule="strict")
    try:
        sim.new_episode(0)
        start = sim.state()
        for _ in range(40):  # the scripted pusher moves the puck
            sim.step(sim.scripted_action())
        goal = sim.state()
        assert sim.distances(goal, start)["obj_dist"] > 0.05
        assert not sim.success(goal, start) and not strict.success(goal, start)
        assert sim.success(goal, goal) and strict.success(goal, goal)
        for _ in range(15):  # the arm goes up and away; the puck stays where it was pushed
            sim.step(np.array([0.0, -1.0, 1.0, -1.0]))
        away = sim.state()
        d = sim.distances(goal, away)
        assert d["obj_dist"] <= 0.05 < 0.10 < d["eef_dist"]
        assert sim.success(goal, away) and not strict.success(goal, away)
        assert sim.state().tolist() == away.tolist()  # judging restored the state it found
        assert sim.describe()["success_rule"] == "metaworld"
    finally:
        sim.close()
        strict.close()
    with pytest.raises(UserError, match="--success-rule"):
        MetaWorldSim("push", 64, success_rule="lenient")
