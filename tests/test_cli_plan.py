"""`wmctl plan offline|sim|compare` on a tiny trained run (real store, real gym-pusht), and the rollout/plan
benchmarks."""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.machine import resolve_device

FAST_CEM = ["--samples", "8", "--elites", "2", "--iterations", "2"]


def test_plan_offline_cli(tiny_run):
    r = CliRunner().invoke(app, ["plan", "offline", "--run", str(tiny_run), "--goal-offset", "2", "--episodes", "1",
                                 *FAST_CEM])
    assert r.exit_code == 0, r.output
    res = json.loads((tiny_run / "plan" / "offline_cem.json").read_text())
    assert res["problems"] >= 1
    assert set(res["latent_distance"]) == {"model_same_noise", "model_fresh_noise"} and res["judge"] is None
    for dist in res["latent_distance"].values():
        for key in ("plan", "ground_truth", "random_mean", "random_best"):
            assert math.isfinite(dist[key]) and dist[key] >= 0
        assert dist["random_best"] <= dist["random_mean"]
    # fresh noise is another draw: the scores differ (a sampler), and the plan is not re-optimised for it
    assert res["latent_distance"]["model_fresh_noise"] != res["latent_distance"]["model_same_noise"]
    assert all(0.0 <= v <= 1.0 for v in res["plan_closer_than_random"].values()) and res["latency_s"]["p50"] > 0
    assert "planning model, fresh noise" in r.output
    r = CliRunner().invoke(app, ["plan", "offline", "--run", str(tiny_run), "--goal-offset", "500"])
    assert r.exit_code == 2 and "lower --goal-offset" in r.output


def test_plan_offline_judged_by_another_model(tiny_run, pusht_store, tmp_path):
    import dataclasses

    from trainer.config import tiny
    from trainer.loop import run_train

    def tf_run(name, **kw):
        return run_train(dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / name, steps=5,
                                             model=dataclasses.replace(tiny().model, kind="teacher_forced"),
                                             context_frames=6, **kw)).run_dir

    judge = tf_run("tf", action_mode="relative_to_state")
    r = CliRunner().invoke(app, ["plan", "offline", "--run", str(tiny_run), "--goal-offset", "2", "--episodes", "1",
                                 "--judge", str(judge), *FAST_CEM])
    assert r.exit_code == 0, r.output
    res = json.loads((tiny_run / "plan" / "offline_cem.json").read_text())
    assert res["judge"].startswith("tf/") and "judge" in res["latent_distance"]
    assert res["latent_distance"]["judge"]["plan"] >= 0 and f"judge {res['judge']}" in r.output
    other = tf_run("tf-abs", action_mode="absolute")
    r = CliRunner().invoke(app, ["plan", "offline", "--run", str(tiny_run), "--goal-offset", "2", "--episodes", "1",
                                 "--judge", str(other), *FAST_CEM])
    assert r.exit_code == 2 and "same action space" in r.output


def test_plan_sim_cli_closes_the_loop_in_gym_pusht(tiny_run):
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(tiny_run), "--episodes", "1", "--goal-offset", "4",
                                 "--max-steps", "4", "--horizon", "2", "--execute", "1", *FAST_CEM])
    assert r.exit_code == 0, r.output
    res = json.loads((tiny_run / "plan" / "sim_cem_none" / "sim.json").read_text())
    for policy in ("model", "random"):
        p = res[policy]
        assert 0.0 <= p["success_rate"] <= 1.0 and p["final_pos_dist"] >= 0
    assert res["model"]["latency_s"]["p50"] > 0
    assert res["trials"] == 1
    assert res["config"]["device"] == str(resolve_device("auto"))  # the default, auto, recorded as what it ran on
    assert re.search(r"plan sim: 2/2 trials, 100% \(", r.output), r.output  # model and random, one trial each
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(tiny_run), "--env", "aloha"])
    assert r.exit_code == 2 and "pusht" in r.output


def test_plan_sim_keeps_each_trial_and_compares_two_planners_trial_by_trial(tiny_run, tmp_path):
    out = tmp_path / "sim"
    base = ["plan", "sim", "--run", str(tiny_run), "--episodes", "2", "--goal-offset", "4", "--max-steps", "2",
            "--horizon", "2", "--execute", "1", *FAST_CEM, "--out", str(out)]
    r = CliRunner().invoke(app, [*base, "--k", "1"])
    assert r.exit_code == 0, r.output
    first = json.loads((out / "sim.json").read_text())
    trials = first["model"]["per_trial"]
    assert len(trials) == first["trials"] >= 1 and len(first["random"]["per_trial"]) == len(trials)
    assert first["model"]["success_rate"] == pytest.approx(sum(t["success"] for t in trials) / len(trials))
    assert first["model"]["final_pos_dist"] == pytest.approx(sum(t["final_pos_dist"] for t in trials) / len(trials))
    assert all(t["plan_s"] > 0 for t in trials) and all(t["plan_s"] is None for t in first["random"]["per_trial"])
    assert len({(t["episode"], t["start"]) for t in trials}) == len(trials)  # drawn without replacement
    # every trial says what its goal demands, and success is reported per group (push vs agent-only)
    assert {t["group"] for t in trials} <= {"push", "agent"}
    groups = first["model"]["by_group"]
    assert sum(g["trials"] for g in groups.values()) == len(trials)
    assert all(g["successes"] == sum(t["success"] for t in trials if t["group"] == k) for k, g in groups.items())
    # another K into the same folder: the first result is kept beside the new one, not overwritten
    r = CliRunner().invoke(app, [*base, "--k", "2"])
    assert r.exit_code == 0, r.output
    kept = sorted(out.glob("sim-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["config"]["k"] == 1
    assert json.loads((out / "sim.json").read_text())["config"]["k"] == 2
    r = CliRunner().invoke(app, [*base, "--k", "2"])  # the same configuration again replaces its own result
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("sim-*.json"))) == 1
    second = json.loads((out / "sim.json").read_text())
    r = CliRunner().invoke(app, ["plan", "compare", "--a", str(kept[0]), "--b", str(out), "--names", "k1,k2",
                                 "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "c.json").read_text())
    a_ok = [t["success"] for t in trials]
    b_ok = [t["success"] for t in second["model"]["per_trial"]]
    assert c["trials"] == len(trials) and (c["success_a"], c["success_b"]) == (sum(a_ok), sum(b_ok))
    assert c["only_a"] == sum(x and not y for x, y in zip(a_ok, b_ok)) and c["both"] + c["only_b"] == sum(b_ok)
    assert 0 < c["mcnemar_p"] <= 1 and "k1 vs k2" in r.output and "McNemar" in r.output
    assert sum(g["trials"] for g in c["by_group"].values()) == c["trials"]
    assert all(f"{g} trials:" in r.output for g in c["by_group"])
    # the random actions of both runs are the same draws on the same trials: no trial separates them
    r = CliRunner().invoke(app, ["plan", "compare", "--a", str(kept[0]), "--b", str(out), "--policy", "random",
                                 "--json", str(tmp_path / "r.json")])
    rnd = json.loads((tmp_path / "r.json").read_text())
    assert (rnd["only_a"], rnd["only_b"], rnd["mcnemar_p"]) == (0, 0, 1.0)
    assert rnd["distances"]["final_pos_dist"]["a_closer"] == rnd["distances"]["final_pos_dist"]["b_closer"] == 0
    r = CliRunner().invoke(app, ["plan", "compare", "--a", str(out), "--a", str(kept[0]), "--b", str(out)])
    assert r.exit_code == 2 and "one --b per --a" in r.output
    r = CliRunner().invoke(app, ["plan", "compare", "--a", str(tmp_path), "--b", str(out)])
    assert r.exit_code == 2 and "no sim.json" in r.output


def test_plan_sim_protocols_fix_the_task_and_are_never_mixed(tiny_run, tmp_path):
    """--protocol swm is stable-worldmodel's PushT task (goal 25 env steps ahead, 50 steps, 5-frame plans at
    frameskip 5): a model trained at another frameskip is refused with the fix, a task option that contradicts the
    protocol is refused, and a gym result is not compared with an swm one."""
    base = ["plan", "sim", "--run", str(tiny_run), "--episodes", "2", *FAST_CEM]
    r = CliRunner().invoke(app, [*base, "--protocol", "swm"])
    assert r.exit_code == 2 and "--set frameskip=5" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--protocol", "swm", "--goal-offset", "10"])
    assert r.exit_code == 2 and "--protocol swm fixes" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--protocol", "nope"])
    assert r.exit_code == 2 and "--protocol 'nope'" in r.output
    from pipeline.stage import UserError
    from planner.results import compare_sims

    gym = {"env": "pusht", "config": {"protocol": "gym", "goal_offset": 25, "max_steps": 50},
           "model": {"per_trial": [{"episode": 0, "start": 1, "success": True}]}}
    swm = {**gym, "config": {**gym["config"], "protocol": "swm"}}
    with pytest.raises(UserError, match="--protocol gym \\(A\\) vs swm \\(B\\)"):
        compare_sims([(gym, swm)])


def test_expected_cost_over_noise_draws_is_the_mean_of_each_draws_cost(tiny_run):
    """--noise-draws D scores a candidate by its mean cost over D independent sampling-noise draws: exactly the mean
    of the costs one-draw planning rollouts with seeds s..s+D-1 give; D = 1 is today's single shared draw."""
    import numpy as np
    import torch

    from planner.core import latent_cost
    from planner.planners import expected_cost_rollout
    from trainer.api import LoadedWorldModel

    wm = LoadedWorldModel.load(tiny_run)
    rng = np.random.default_rng(0)
    sh = wm.shape
    tokens = rng.standard_normal((2, sh.cameras, sh.grid[0] * sh.grid[1], sh.enc_dim)).astype(np.float32)
    ctx = wm.normalize(tokens, rng.standard_normal((2, wm.state_dim)) if wm.state_dim else None)
    acts = torch.zeros(2, wm.actions.frame_dim)
    cand = torch.randn(5, 3, wm.actions.frame_dim) * 0.1
    cost = latent_cost(ctx[-1], state_dim=wm.state_dim)
    rollout, mean_cost = expected_cost_rollout(wm, ctx, acts, cost, k=1, seed=7, draws=3)
    got = mean_cost(rollout(cand), cand)
    each = [cost(wm.planning_rollout(ctx, context_actions_TA=acts, k=1, seed=7 + d)(cand), cand) for d in range(3)]
    torch.testing.assert_close(got, torch.stack(each).mean(0))
    assert not torch.allclose(each[0], each[1])  # the draws differ: the mean is not one of them
    one, same = expected_cost_rollout(wm, ctx, acts, cost, k=1, seed=7, draws=1)
    torch.testing.assert_close(same(one(cand), cand), each[0])


def test_bench_rollout_cached_equals_uncached_and_reports_a_speedup():
    r = CliRunner().invoke(app, ["bench", "rollout", "--preset", "tiny", "--horizon", "3", "--batch", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["max_abs_diff"] < 1e-3  # nothing evicted from the cache: both compute the same rollout
    assert res["cached_s"] > 0 and res["uncached_s"] > 0 and res["speedup"] == res["uncached_s"] / res["cached_s"]


def test_bench_plan_reports_each_preset():
    import torch

    r = CliRunner().invoke(app, ["bench", "plan", "--presets", "tiny", "--samples", "4", "--iterations", "1",
                                 "--horizon", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    (row,) = res["rows"]
    assert row["preset"] == "tiny" and row["ms_per_mpc_step"] > 0 and row["model_evals_per_step"] == 4 * 1 * 2 * 4
    # counted on the network: H x K per CEM iteration (no pass after the last frame, and none re-committing when
    # the tiny model's 4-frame window slides past its 4 context frames), the context committed once
    assert row["model_passes_per_iteration"] == 2 * 4
    assert row["context_passes_per_step"] == 1 and row["rollout_calls_per_step"] == 1
    if not torch.cuda.is_available():  # CUDA graphs: refused with the fix named, not silently timed eager
        r = CliRunner().invoke(app, ["bench", "plan", "--presets", "tiny", "--graph", "--device", "cpu"])
        assert r.exit_code == 2 and "--graph" in r.output and "GPU" in r.output


def test_bench_decode_gives_frames_per_core_and_cores_per_gpu(multicam_root):
    """On the built-in 3-camera AV1 data: single-threaded decode equals lerobot's frames; frames per CPU-second
    and the cores that feed an encoder taking 3,000 images/s follow from the measured CPU time."""
    r = CliRunner().invoke(app, ["bench", "decode", "--root", str(multicam_root), "--episodes", "2",
                                 "--encoder-rate", "3000"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert "av1" in res["video"] and "320x180" in res["video"] and res["cameras"] == 3 and res["mismatched_frames"] == 0
    assert res["decoder_threads"] == 1 and res["sequential_cpu_s"] > 0
    assert res["frames_per_cpu_s"] == pytest.approx(res["frames"] / res["sequential_cpu_s"])
    assert res["cores_per_gpu"] == pytest.approx(3000 / res["frames_per_cpu_s"])


def test_bench_train_times_real_steps_on_a_store(pusht_store):
    r = CliRunner().invoke(app, ["bench", "train", "--store", str(pusht_store), "--preset", "tiny", "--steps", "8",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["steps_timed"] == 5  # 8 steps: 3 warm-up steps dropped, at least 5 kept
    assert res["step_s"] > 0 and res["tokens_per_s"] > 0 and 0.0 <= res["data_wait_share"] < 1.0
    assert res["params_M"] > 0 and res["achieved_tflops"] > 0
    r = CliRunner().invoke(app, ["bench", "train", "--store", str(pusht_store.parent / "missing.zarr")])
    assert r.exit_code == 2 and "wmctl encode" in r.output


@pytest.mark.slow
def test_compiled_rollouts_plan_like_eager_ones(tiny_run):
    """`plan --compile`: the torch.compiled model (dynamic shapes, KV cache growing per frame) gives the
    planner the same latents as the eager one."""
    import torch

    from trainer.api import LoadedWorldModel

    eager, compiled = LoadedWorldModel.load(tiny_run), LoadedWorldModel.load(tiny_run, compile=True)
    lo, hi = (torch.as_tensor(b, dtype=torch.float32) for b in eager.actions.bounds())
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, eager.shape.latent_tokens, eager.shape.enc_dim, generator=g)
    acts = lo + (hi - lo) * torch.rand(8, 3, len(lo), generator=g)
    for _ in range(2):  # the second call runs the compiled code without compiling
        want = eager.plan_rollout(ctx, acts, seed=1)
        got = compiled.plan_rollout(ctx, acts, seed=1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_graphed_rollouts_equal_the_plain_ones_and_read_only_their_static_buffers(tiny_run):
    """`use_graphs` (the planner's rollouts as CUDA graphs, `trainer.sampling.CapturedRollout`): the code a graph
    captures, run eagerly on its static buffers (`capture=False`: no CUDA here), gives the plain rollouts'
    latents for two MPC steps in a row (another context, context actions and seed copied into the same graph),
    and while it runs it neither copies host data to the device nor reads a device value back (either breaks a
    capture or bakes one call's values into every replay: checked on every op it dispatches). Gradient rollouts
    stay eager; capturing asks for CUDA."""
    import torch
    from capture_audit import HostDataAudit

    from pipeline.stage import UserError
    from trainer.api import LoadedWorldModel
    from trainer.kv_cache import _slot_tensors

    plain, graphed = LoadedWorldModel.load(tiny_run), LoadedWorldModel.load(tiny_run)
    with pytest.raises(UserError, match="CUDA"):
        graphed.use_graphs()
    graphed.use_graphs(capture=False)
    lo, hi = (torch.as_tensor(b, dtype=torch.float32) for b in plain.actions.bounds())
    g = torch.Generator().manual_seed(0)
    N, Z, A = plain.shape.latent_tokens, plain.shape.enc_dim, len(lo)
    for seed in (1, 2):  # two MPC steps: one graph, refilled
        ctx = torch.randn(2, N, Z, generator=g)
        ctx_actions = lo + (hi - lo) * torch.rand(2, A, generator=g)
        acts = lo + (hi - lo) * torch.rand(8, 3, A, generator=g)
        want = plain.plan_rollout(ctx, acts, context_actions_TA=ctx_actions, seed=seed)
        got = graphed.plan_rollout(ctx, acts, context_actions_TA=ctx_actions, seed=seed)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(graphed.graphs) == 1
    graph = next(iter(graphed.graphs.values()))
    _slot_tensors.cache_clear()  # the warm-up run makes the slot masks; the captured run must only read them
    graph._run()
    audit = HostDataAudit()
    with torch.no_grad(), audit:
        graph._run()
    assert audit.seen == []
    _slot_tensors.cache_clear()
    with audit:  # the audit itself catches host data
        graph._run()
    assert "aten.lift_fresh.default" in audit.seen
    a = acts.clone().requires_grad_(True)  # the gradient planner: eager, no graph, same latents
    out = graphed.plan_rollout(ctx, a, context_actions_TA=ctx_actions, grad=True, seed=2)
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
    out.pow(2).mean().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and len(graphed.graphs) == 1


def test_bf16_planning_rollouts_follow_the_fp32_ones(tiny_run):
    """`plan --precision bf16`: the weights and rollouts in bf16 (fp32 contexts and actions cast on the way in)
    give the planner the fp32 model's latents to bf16's rounding, with and without gradients; `auto` is fp32 on
    the CPU; a precision that is not one is refused."""
    import torch

    from pipeline.stage import UserError
    from trainer.api import LoadedWorldModel

    fp32, bf16 = LoadedWorldModel.load(tiny_run), LoadedWorldModel.load(tiny_run, precision="bf16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert LoadedWorldModel.load(tiny_run, precision="auto").dtype == torch.float32
    lo, hi = (torch.as_tensor(b, dtype=torch.float32) for b in fp32.actions.bounds())
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, fp32.shape.latent_tokens, fp32.shape.enc_dim, generator=g)
    acts = lo + (hi - lo) * torch.rand(8, 3, len(lo), generator=g)
    want = fp32.plan_rollout(ctx, acts, seed=1)
    got = bf16.plan_rollout(ctx, acts, seed=1)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = (got.float() - want).pow(2).mean() / want.pow(2).mean()
    assert err < 1e-3, f"bf16 rollout relative MSE {err:.2e}"
    a = acts.clone().requires_grad_(True)
    bf16.plan_rollout(ctx, a, grad=True, seed=1).float().pow(2).mean().backward()  # the gradient planner's path
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    with pytest.raises(UserError, match="fp16"):
        LoadedWorldModel.load(tiny_run, precision="fp16")


def test_bf16_on_a_cpu_without_bf16_units_warns_once(caplog):
    """bf16 on a CPU that only emulates it (no AVX512-BF16 / AMX: a `small` MPC step 21.5 s instead of 2.9 s on a
    2-core AVX2 EPYC) is kept but warned about, once per process, naming the fix; fp32, and auto on the CPU, say
    nothing; on CUDA bf16 is native."""
    import logging

    import torch

    from pipeline.machine import native_bf16
    from trainer import precision

    assert native_bf16(torch.device("cuda"))
    precision._warn_emulated_bf16.cache_clear()
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="wmctl"):
        assert not precision.uses_bf16("fp32", cpu) and not precision.uses_bf16("auto", cpu)
        assert not caplog.records
        assert precision.uses_bf16("bf16", cpu) and precision.uses_bf16("bf16", cpu)
    warned = [r for r in caplog.records if "emulates" in r.getMessage()]
    if native_bf16(cpu):
        assert not warned
    else:
        assert len(warned) == 1 and "--precision fp32" in warned[0].getMessage()


def test_plan_sim_in_bf16_records_its_dtype(tiny_run):
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(tiny_run), "--episodes", "1", "--goal-offset", "4",
                                 "--max-steps", "2", "--horizon", "2", "--execute", "1", "--precision", "bf16",
                                 *FAST_CEM])
    assert r.exit_code == 0, r.output
    res = json.loads((tiny_run / "plan" / "sim_cem_none" / "sim.json").read_text())
    assert res["dtype"] == "bfloat16" and res["model"]["latency_s"]["p50"] > 0


@pytest.mark.slow
def test_bench_gpu_script_runs_on_cpu_sizes(tmp_path):
    """`make bench-gpu`'s script at CPU sizes, so it cannot rot between GPU runs (the encode section has its
    own tests; it needs the built-in multi-camera data)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench_gpu.py"), "--size", "cpu", "--out", str(out),
                        "--only", "encoder,train,generate,plan"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert all(v.startswith("ok") for v in res["sections"].values()), res["sections"]
    assert res["encoder_images_per_s"] > 0 and res["train_eager_step_s"] > 0 and res["train_eager_flops_per_step"] > 0
    assert res["plan_tiny_model_passes_per_iteration"] == 5 * 4 and res["generate_frames_per_s"] > 0
    # the CUDA-graph path of the plan section runs uncaptured here and gives the plain rollout to the bit
    assert "plan_tiny_graph_error" not in res and res["plan_tiny_graph_captured"] is False
    assert res["plan_tiny_graph_max_abs_diff"] == 0 and res["plan_tiny_ms_per_mpc_step_graph"] > 0


def test_plan_sim_with_the_icem_budget_executing_the_mean(tiny_run):
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(tiny_run), "--episodes", "1", "--goal-offset", "4",
                                 "--max-steps", "4", "--horizon", "2", "--execute", "1", "--cem", "icem",
                                 "--samples", "8", "--execute-plan", "mean"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tiny_run / "plan" / "sim_cem_none" / "sim.json").read_text())["config"]
    assert cfg["cem"]["samples"] == 8 and cfg["cem"]["iterations"] == 3 and cfg["cem"]["noise_beta"] == 2.0
    assert cfg["execute_plan"] == "mean"
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(tiny_run), "--cem", "nope"])
    assert r.exit_code == 2 and "dinowm" in r.output


def test_plan_sim_encodes_only_the_frames_a_plan_reads():
    import numpy as np
    import torch

    from planner.sim import _Episode, _observe

    seen = []

    def encode(img, robot):
        seen.append(int(img[0]))
        return torch.full((3, 2), float(img[0] + robot[0]))

    ep = _Episode(history=[None], frames=[np.array([0])], robot=[np.array([10.0])])
    _observe(ep, encode, context=2)
    assert seen == [0]  # the first plan reads the start frame only
    for i in range(1, 5):  # four frames executed before the next plan, with a context of two
        ep.history.append(None)
        ep.frames.append(np.array([i]))
        ep.robot.append(np.array([10.0 * (i + 1)]))
    _observe(ep, encode, context=2)
    assert seen == [0, 3, 4]  # frames 1 and 2 are never read: never encoded
    assert [h is None for h in ep.history] == [False, True, True, False, False]
    assert float(ep.history[4][0, 0]) == 4 + 50.0  # each with its own frame's robot state
    _observe(ep, encode, context=2)
    assert seen == [0, 3, 4]  # nothing encoded twice
