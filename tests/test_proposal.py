"""The amortized proposal: trained on a run's labelled windows and saved with it (reloaded bit for bit, not trained
twice), recovering actions from the latent change where they are recoverable, and planning: CEM seeded by it, the
proposal alone, through the registry, the MPC step of the policy and server, and `wmctl bench plan`'s rows."""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
from synthetic import write_token_world

from featurestore.reader import TokenReader, Window
from pipeline.stage import UserError
from planner.cem import CEMConfig
from planner.core import ActionSpec, latent_cost, project
from planner.latent_mpc import Goal, LatentMPC, MPCConfig
from planner.planners import PLANNERS, plan, settings, spec_for
from planner.proposal import Observation, ProposalPlanConfig
from trainer.api import LoadedWorldModel
from trainer.proposal import RECORD, WEIGHTS, ProposalConfig, full_frame, load_proposal, proposal_dir
from trainer.proposal_train import fit_proposal, train_proposal
from trainer.runs import RunState
from trainer.tokens import FrameLayout, TokenShape

SMALL = ProposalConfig(horizon=3, max_goal=4, width=16, queries=2, hidden=32, batch_size=4, val_windows=8)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """tiny_run's folder copied (its proposal written into the copy, not the session's run)."""
    return shutil.copytree(tiny_run, tmp_path / "run")


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """A copy of tiny_run with a proposal trained for a few steps."""
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("proposal") / "run")
    train_proposal(run, steps=3, config=SMALL)
    return run


class Fixed:
    """A proposal that proposes one fixed sequence whatever it sees."""

    def __init__(self, actions_HA: torch.Tensor):
        self.actions = actions_HA

    @property
    def horizon(self) -> int:
        return len(self.actions)

    def propose(self, current_NZ, goal_NZ):
        return self.actions.clone()


def test_a_trained_proposal_reloads_bit_for_bit_and_the_same_training_is_not_done_twice(run_copy):
    rep = train_proposal(run_copy, steps=4, config=SMALL)
    folder = proposal_dir(run_copy)
    assert rep.trained and rep.folder == folder and rep.steps == 4 and rep.val_windows > 0
    assert set(rep.action_error) == {"proposal", "mean_action", "zero_action", "random"}
    state = RunState.read(run_copy)
    net, losses, score = fit_proposal(state, state.store, 4, SMALL, torch.device("cpu"))  # the same, in memory
    loaded = load_proposal(folder)
    want = net.state_dict()
    assert loaded.net.state_dict().keys() == want.keys()
    assert all(torch.equal(loaded.net.state_dict()[k], want[k]) for k in want)
    assert {k: v for k, v in score.items() if k != "windows"} == rep.action_error and len(losses) == 4

    # its output is the model's raw per-frame actions: normalised by the world model, the head's output again
    wm = LoadedWorldModel.load(run_copy)
    cur, goal = torch.randn(2, wm.shape.latent_tokens, wm.shape.enc_dim).unbind(0)
    proposed = loaded.for_model(wm).propose(cur, goal)
    assert proposed.shape == (SMALL.horizon, wm.actions.frame_dim)
    with torch.no_grad():
        torch.testing.assert_close(wm.actions.normalize_frames(proposed), net(cur[None], goal[None])[0])

    stamps = [(folder / f).stat().st_mtime_ns for f in (RECORD, WEIGHTS)]
    again = train_proposal(run_copy, steps=4, config=SMALL)
    assert not again.trained and dataclasses.replace(again, trained=True) == rep
    assert [(folder / f).stat().st_mtime_ns for f in (RECORD, WEIGHTS)] == stamps  # nothing written
    more = train_proposal(run_copy, steps=5, config=SMALL)
    assert more.trained and more.steps == 5 and load_proposal(folder).record["steps"] == 5


def test_a_training_stopped_midway_continues_from_its_last_save_and_ends_as_an_uninterrupted_one(run_copy,
                                                                                                  monkeypatch):
    from trainer import proposal_train

    real, seen = proposal_train.Windows.batch, []

    def stopping(self, step, size, seed):
        if size == SMALL.batch_size and step == 5:
            raise KeyboardInterrupt  # stopped at step 5: the last save was after step 4
        seen.append(step)
        return real(self, step, size, seed)

    monkeypatch.setattr(proposal_train.Windows, "batch", stopping)
    with pytest.raises(KeyboardInterrupt):
        train_proposal(run_copy, steps=7, config=SMALL, save_every=2)
    folder = proposal_dir(run_copy)
    assert not (folder / RECORD).exists() and (folder / proposal_train.PARTIAL_RECORD).is_file()
    monkeypatch.setattr(proposal_train.Windows, "batch", lambda self, *a: seen.append(a[0]) or real(self, *a))
    seen.clear()
    rep = train_proposal(run_copy, steps=7, config=SMALL, save_every=2)
    assert rep.trained and rep.resumed_from == 4 and seen[:3] == [4, 5, 6]  # steps 0-3 were not trained again
    assert not (folder / proposal_train.PARTIAL_RECORD).exists() and not (folder / proposal_train.PARTIAL).exists()
    state = RunState.read(run_copy)
    net, losses, _ = fit_proposal(state, state.store, 7, SMALL, torch.device("cpu"))  # uninterrupted, in memory
    loaded = load_proposal(folder).net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    assert rep.train_loss == losses[-1]


def test_a_torn_proposal_and_one_of_another_model_are_refused(trained):
    folder = proposal_dir(trained)
    wm = LoadedWorldModel.load(trained)
    other = dataclasses.replace(wm, stats=dataclasses.replace(wm.stats, action_std=wm.stats.action_std * 2))
    with pytest.raises(UserError, match="another model"):
        load_proposal(folder).for_model(other)
    weights = folder / WEIGHTS
    saved = weights.read_bytes()
    try:
        weights.write_bytes(saved[:-8] + bytes(8))
        with pytest.raises(UserError, match="torn"):
            load_proposal(folder)
    finally:
        weights.write_bytes(saved)


@pytest.mark.parametrize("proprio", [False, True])
def test_the_proposal_recovers_the_action_from_the_latent_change(tmp_path, proprio):
    """The synthetic token world: a blob moved by each action (a 2-D delta), so a frame and the next one give the
    action between them (up to the walls). Trained on its train episodes, the proposal's val error is a fraction
    of the mean and zero actions' errors; with proprioception (the blob's position as the state token, actions
    relative to it) too."""
    from trainer.config import tiny
    from trainer.loop import run_train

    store = write_token_world(tmp_path / "world.zarr", episodes=24)
    kw = dict(proprio=True, action_mode="relative_to_state", context_mode="clean_context") if proprio else {}
    run_train(dataclasses.replace(tiny(), store=store, out=tmp_path / "run", steps=2, eval_every=2, ckpt_every=2,
                                  **kw))
    assert LoadedWorldModel.load(tmp_path / "run").state_dim == (2 if proprio else 0)
    rep = train_proposal(tmp_path / "run", steps=200,
                         config=ProposalConfig(horizon=1, max_goal=1, width=32, hidden=64, lr=3e-3))
    err = rep.action_error
    assert rep.val_windows > 0
    assert err["mean_action"] > 0.5 and err["zero_action"] > 0.5  # the val actions are not near-constant
    assert err["proposal"] < 0.5 * min(err["mean_action"], err["zero_action"]), err


def test_a_sources_cameras_go_into_their_slots():
    """A view of fewer cameras than the model (a source's): its blocks in their slots, the others zero, the state
    token last, as training's windows hold them."""
    shape = TokenShape(cameras=3, grid=(1, 2), enc_dim=4, action_dim=2, state_dim=2)
    view = torch.arange(5 * 4, dtype=torch.float32).view(5, 4)  # cameras 2 and 0 (2 tokens each), then the state
    full = full_frame(view, shape, FrameLayout(slots=(2, 0)))
    assert full.shape == (7, 4)
    torch.testing.assert_close(full[4:6], view[0:2])
    torch.testing.assert_close(full[0:2], view[2:4])
    torch.testing.assert_close(full[6], view[4])
    assert not full[2:4].any()
    assert full_frame(view, shape, FrameLayout()) is view


def _spy(rollout):
    calls = []

    def spied(actions_SHA, grad=False):
        calls.append(actions_SHA.clone())
        return rollout(actions_SHA)

    return spied, calls


def test_cem_seeded_by_the_proposal_starts_from_its_actions_and_keeps_the_warm_start_as_a_candidate():
    H, A = 4, 2
    spec = ActionSpec(low=(-1.0,) * A, high=(1.0,) * A, max_delta=(0.5,) * A)
    seq = torch.tensor([[0.3, -0.2], [0.5, 0.1], [0.7, 0.2], [0.8, 0.3]])
    warm = torch.full((H, A), -0.4)
    rollout, calls = _spy(lambda a: a[:, :, None, :])
    obs = Observation(None, torch.zeros(1, A), torch.zeros(1, A), Fixed(seq))
    res = plan("cem+proposal", rollout, latent_cost(torch.zeros(1, A)), spec, CEMConfig(samples=16, elites=4,
               iterations=2), horizon=H, generator=torch.Generator().manual_seed(0), init_mean_HA=warm,
               observation=obs)
    first = calls[0]
    torch.testing.assert_close(first[0], project(seq[None], spec)[0])  # sample 0 of the first iteration: the mean
    torch.testing.assert_close(first[-1], project(warm[None], spec)[0])  # the warm start: one candidate
    assert res.model_evaluations == 16 * 2
    plain, plain_calls = _spy(lambda a: a[:, :, None, :])
    plan("cem", plain, latent_cost(torch.zeros(1, A)), spec, CEMConfig(samples=16, elites=4, iterations=2),
         horizon=H, generator=torch.Generator().manual_seed(0), init_mean_HA=warm)
    torch.testing.assert_close(plain_calls[0][0], project(warm[None], spec)[0])  # plain CEM: from the warm start


def test_the_proposal_alone_is_its_sequence_within_the_action_constraints():
    spec = ActionSpec(low=(-1.0, -1.0), high=(1.0, 1.0), max_delta=(0.6, 0.6))
    seq = torch.tensor([[0.2, 0.1], [2.0, -0.3], [0.9, -3.0]])  # out of bounds, and jumps beyond max_delta
    previous = torch.tensor([0.0, 0.0])
    res = plan("proposal", None, latent_cost(torch.zeros(1, 2)), spec, ProposalPlanConfig(), horizon=5,
               generator=torch.Generator(), previous_A=previous, observation=Observation(None, None, None, Fixed(seq)))
    assert res.actions.shape == (5, 2) and res.model_evaluations == 0 and res.costs_per_iteration == []
    padded = torch.cat([seq, seq[-1:].expand(2, -1)])  # past its own horizon: its last action held
    torch.testing.assert_close(res.actions, project(padded[None], spec, previous)[0])
    torch.testing.assert_close(res.actions[0], seq[0])  # inside the constraints: unchanged
    lo, hi, md = spec.tensors()
    assert torch.all(res.actions >= lo) and torch.all(res.actions <= hi)
    assert torch.all(torch.cat([previous[None], res.actions]).diff(dim=0).abs() <= md + 1e-6)
    with pytest.raises(UserError, match="does not pass"):
        plan("proposal", None, latent_cost(torch.zeros(1, 2)), spec, ProposalPlanConfig(), generator=torch.Generator())


def test_the_planner_settings_of_a_stage_config():
    from planner.sim import SimConfig

    cfg = SimConfig(planner="cem+proposal", cem=CEMConfig(samples=12, elites=3))
    assert settings("cem+proposal", cfg) is cfg.cem and settings("proposal", cfg) == ProposalPlanConfig()
    assert set(PLANNERS) == {"cem", "gd", "cem+proposal", "proposal"}
    with pytest.raises(UserError, match="cem\\+proposal or proposal"):
        MPCConfig(planner="policy")


def _problem(wm: LoadedWorldModel):
    """A val window of the run's store: 2 context frames, a goal 3 frames after the last, their latents."""
    reader = TokenReader(wm.store)
    row = int(reader.episodes.index[(reader.episodes.split == "val") & reader.episodes.has_actions][0])
    w = reader.read(Window(row, 0, 5), ("patch", "state"))
    z = wm.normalize(w["patch"], w["state"] if wm.state_dim else None)
    return z[:2], z[-1]


def test_the_mpc_step_plans_with_the_runs_proposal(trained, tiny_run):
    wm = LoadedWorldModel.load(trained)
    ctx, goal = _problem(wm)
    encode = lambda images, state: goal  # noqa: E731 - the goal's latents, whatever the images
    commits = []
    real = wm.planning_rollout
    wm.planning_rollout = lambda *a, **kw: commits.append(1) or real(*a, **kw)
    mpc = LatentMPC(wm, encode, MPCConfig(horizon=3, execute=2, planner="proposal"), Goal(np.zeros((1, 4, 4, 3)),
                                                                                          None))
    got = mpc.plan(ctx, torch.zeros(2, wm.actions.frame_dim), shift=0)
    want = project(load_proposal(proposal_dir(trained)).propose(ctx[-1], goal)[None], mpc.spec)[0]
    np.testing.assert_array_equal(got, want.numpy())
    assert commits == []  # the proposal alone: no context committed, no rollout

    seeded = LatentMPC(wm, encode, MPCConfig(horizon=3, execute=2, planner="cem+proposal",
                                             cem=CEMConfig(samples=8, elites=2, iterations=1)), Goal(
                                                 np.zeros((1, 4, 4, 3)), None))
    plan_HA = seeded.plan(ctx, torch.zeros(2, wm.actions.frame_dim), shift=0)
    lo, hi, _ = spec_for(wm).tensors()
    assert plan_HA.shape == (3, wm.actions.frame_dim) and commits == [1]
    assert np.all(plan_HA >= lo.numpy() - 1e-6) and np.all(plan_HA <= hi.numpy() + 1e-6)

    bare = LoadedWorldModel.load(tiny_run)  # a run without a proposal: refused when the MPC is made, with the fix
    with pytest.raises(UserError, match="no trained proposal"):
        LatentMPC(bare, encode, MPCConfig(planner="cem+proposal"), Goal(np.zeros((1, 4, 4, 3)), None))


def test_bench_plan_times_the_proposal_rows_beside_cem():
    from planner.bench import BenchCase, bench_plan

    wm = LoadedWorldModel.fresh("tiny", grid=(3, 3), enc_dim=16, action_dim=2)
    case = BenchCase("tiny", wm, (wm.shape.latent_tokens, wm.shape.enc_dim), wm.params_M)
    res = bench_plan([case], samples=4, iterations=1, horizon=2, repeats=1, planners=("cem", "cem+proposal",
                                                                                      "proposal"))
    rows = {r["planner"]: r for r in res["rows"]}
    assert list(rows) == ["cem", "cem+proposal", "proposal"] and all(r["ms_per_mpc_step"] > 0 for r in rows.values())
    assert rows["proposal"]["model_evals_per_step"] == 0 and rows["proposal"]["rollout_calls_per_step"] == 0
    assert rows["proposal"]["context_passes_per_step"] == 0
    for key in ("model_evals_per_step", "model_passes_per_iteration", "context_passes_per_step"):
        assert rows["cem+proposal"][key] == rows["cem"][key]  # the same search, from another mean
    assert rows["proposal"]["proposal_params_M"] > 0 and "proposal_params_M" not in rows["cem"]


def test_bench_plan_command_times_the_planners_asked_for_and_refuses_unknown_ones():
    """`wmctl bench plan --planners`: one row per preset and planner, in the order given; a name that is not a
    planner bench plan times (gd, a typo) exits 2 naming the choices."""
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    base = ["bench", "plan", "--presets", "tiny", "--samples", "4", "--iterations", "1", "--horizon", "2",
            "--grid", "3x3", "--enc-dim", "16", "--device", "cpu"]
    r = CliRunner().invoke(app, [*base, "--planners", "cem,cem+proposal,proposal"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output.strip().splitlines()[-1])["rows"]
    assert [(x["preset"], x["planner"]) for x in rows] == [("tiny", "cem"), ("tiny", "cem+proposal"),
                                                           ("tiny", "proposal")]
    assert rows[2]["model_evals_per_step"] == 0 and rows[1]["proposal_params_M"] > 0
    for given, bad in (("proposal,cme", "cme"), ("gd", "gd")):
        r = CliRunner().invoke(app, [*base, "--planners", given])
        assert r.exit_code == 2 and f"--planners '{bad}'" in r.output, r.output
        assert "choose from cem, cem+proposal, proposal" in r.output


def test_an_export_carries_the_runs_proposal_and_plans_with_it(trained, tmp_path, pusht_store):
    """`wmctl export` of a run with a proposal: proposal/ in the export (listed in config.json and the model card,
    no path of this machine in its record), loaded by the planners' loader with the run's very weights, and
    `plan offline --planner proposal` plans from the export with the run deleted."""
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app
    from trainer.export import PROPOSAL_FILES, upload_files

    run = shutil.copytree(trained, tmp_path / "run")
    out = tmp_path / "shared" / "tiny-wm"
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 0 and "amortized proposal" in r.output, r.output
    assert sorted(p.name for p in (out / "proposal").iterdir()) == [RECORD, WEIGHTS]
    assert json.loads((out / "config.json").read_text())["proposal"]["files"] == list(PROPOSAL_FILES)
    assert "proposal/" in (out / "README.md").read_text() and upload_files(out)[-2:] == list(PROPOSAL_FILES)
    assert str(tmp_path).encode() not in (out / "proposal" / RECORD).read_bytes()
    mine, theirs = load_proposal(run / "proposal"), load_proposal(out / "proposal")
    assert mine.net.state_dict().keys() == theirs.net.state_dict().keys()
    assert all(torch.equal(v, theirs.net.state_dict()[k]) for k, v in mine.net.state_dict().items())
    shutil.rmtree(run)
    r = CliRunner().invoke(app, ["plan", "offline", "--run", str(out), "--store", str(pusht_store), "--goal-offset",
                                 "2", "--episodes", "1", "--planner", "proposal", "--out", str(tmp_path / "plan")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "plan" / "offline_proposal.json").read_text())["problems"] >= 1

    bare = tmp_path / "bare"  # a run without a proposal exports as before: no proposal/, none listed
    r = CliRunner().invoke(app, ["export", str(shutil.copytree(trained, tmp_path / "run2")), "--out", str(bare)])
    shutil.rmtree(tmp_path / "run2" / "proposal")
    r = CliRunner().invoke(app, ["export", str(tmp_path / "run2"), "--out", str(bare), "--force"])
    assert r.exit_code == 0 and not (bare / "proposal").exists(), r.output
    assert json.loads((bare / "config.json").read_text())["proposal"] is None


def test_train_proposal_takes_the_runs_lock_and_is_refused_while_another_process_owns_the_run(run_copy):
    """A run whose LOCK names a live process (this test's: as a `train --resume` or another `train-proposal` would
    hold it): `wmctl train-proposal` exits 2 naming the owner and writes nothing; a training that fails releases
    the lock; one that ends releases it too."""
    import json
    import os
    import socket

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.stage import owner_tag

    def listing():
        return sorted(str(p.relative_to(run_copy)) for p in run_copy.rglob("*"))

    holder = {"owner": owner_tag(), "host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01 00:00:00"}
    (run_copy / "LOCK").write_text(json.dumps(holder))
    before = listing()
    train = ["train-proposal", "--run", str(run_copy), "--steps", "2", "--horizon", "2", "--batch-size", "4",
             "--save-every", "0"]
    r = CliRunner().invoke(app, train)
    assert r.exit_code == 2, r.output
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in r.output and "in use" in r.output
    assert listing() == before and json.loads((run_copy / "LOCK").read_text()) == holder
    (run_copy / "LOCK").unlink()
    with pytest.raises(UserError, match="no labelled train episode"):  # fails while it holds the lock
        train_proposal(run_copy, steps=2, config=dataclasses.replace(SMALL, horizon=500))
    assert not (run_copy / "LOCK").exists()
    r = CliRunner().invoke(app, train)
    assert r.exit_code == 0, r.output
    assert (run_copy / "proposal" / RECORD).is_file() and not (run_copy / "LOCK").exists()


def test_a_proposal_planner_on_a_run_without_a_proposal_names_the_command_that_trains_it(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    for planner in ("proposal", "cem+proposal"):
        r = CliRunner().invoke(app, ["plan", "offline", "--run", str(tiny_run), "--goal-offset", "2", "--episodes",
                                     "1", "--planner", planner, "--out", str(tmp_path)])
        assert r.exit_code == 2, r.output
        [line] = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert f"run `wmctl train-proposal --run {tiny_run}` first" in line, r.output
    assert not (tiny_run / "proposal").exists() and not list(tmp_path.iterdir())


def test_the_commands_train_the_proposal_and_plan_with_it_offline_and_in_closed_loop(run_copy):
    """`wmctl train-proposal`, then `plan offline` and `plan sim` with --planner proposal / cem+proposal: the
    proposal reaches the planners through the commands (a planner that needs it and is not given it refuses)."""
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    train = ["train-proposal", "--run", str(run_copy), "--steps", "3", "--horizon", "2", "--batch-size", "4",
             "--save-every", "0"]
    r = CliRunner().invoke(app, train)
    assert r.exit_code == 0 and "val action error (std units)" in r.output, r.output
    assert (run_copy / "proposal" / "proposal.json").is_file()
    r = CliRunner().invoke(app, train)
    assert r.exit_code == 0 and "nothing to do" in r.output, r.output
    fast = ["--samples", "8", "--elites", "2", "--iterations", "2"]
    for planner in ("proposal", "cem+proposal"):
        r = CliRunner().invoke(app, ["plan", "offline", "--run", str(run_copy), "--goal-offset", "2", "--episodes",
                                     "1", "--planner", planner, *fast])
        assert r.exit_code == 0, r.output
        res = json.loads((run_copy / "plan" / f"offline_{planner}.json").read_text())
        assert res["problems"] >= 1 and res["latency_s"]["p50"] > 0
        assert math.isfinite(res["action_error_vs_ground_truth"]["plan"])
    r = CliRunner().invoke(app, ["plan", "sim", "--run", str(run_copy), "--episodes", "1", "--goal-offset", "4",
                                 "--max-steps", "4", "--horizon", "2", "--execute", "1", "--planner", "proposal",
                                 *fast])
    assert r.exit_code == 0, r.output
    sim = json.loads((run_copy / "plan" / "sim_proposal_none" / "sim.json").read_text())
    assert sim["config"]["planner"] == "proposal" and len(sim["model"]["per_trial"]) == 1
