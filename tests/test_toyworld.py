"""The toy token world: its exact predictive distribution, its store, and the study harness on a trained model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from featurestore.reader import TokenReader, Window
from pipeline.stage import ConfigMismatchError
from trainer.toyworld import ACTION_RANGE, ToyWorld, measure, step, world_of, write_toy_world


def test_true_mean_and_variance_are_those_of_the_worlds_own_samples():
    world, rng = ToyWorld.make(0), np.random.default_rng(1)
    pos = np.array([1.2, 2.1])
    draws = world.true_samples(pos, 4000, rng)
    np.testing.assert_allclose(draws.mean(0), world.true_mean(pos), atol=0.05)
    np.testing.assert_allclose(draws.var(0), world.true_variance(), rtol=0.1, atol=2e-3)
    assert world.true_variance().max() > 10 * world.true_variance().min()  # the distractor's tokens vary, the rest not


@pytest.mark.parametrize("action_range", [ACTION_RANGE, 1.5])
def test_the_null_action_mean_averages_the_next_frame_over_the_actions(action_range):
    world = ToyWorld.make(0, action_range)
    pos = np.array([0.3, 2.4])  # near an edge: clipping matters
    np.testing.assert_allclose(world.null_action_mean(pos, 0, np.random.default_rng(0)), world.true_mean(pos))
    grid = ((np.arange(81) + 0.5) / 81 * 2 - 1) * action_range  # E over the uniform action: midpoint quadrature
    exact = np.mean([world.true_mean(step(pos, np.array([a, b]))) for a in grid for b in grid], axis=0)
    mc = world.null_action_mean(pos, 1, np.random.default_rng(0), draws=16000)
    np.testing.assert_allclose(mc, exact, atol=0.02)
    assert np.abs(exact - world.true_mean(pos)).max() > 0.1  # not knowing the action blurs the agent


def test_larger_actions_explain_more_of_the_next_frame():
    """The null action's floor (the error of the true mean without the actions) grows with the action range,
    the oracle's (the true variance) does not: a wider range makes "the model uses its actions" measurable."""
    rng = np.random.default_rng(0)
    starts = rng.uniform(0, 3, (24, 2))
    floors = []
    for action_range in (ACTION_RANGE, 1.5):
        world = ToyWorld.make(0, action_range)
        err = []
        for pos in starts:
            moved = step(pos, world.action(rng))
            err.append(((world.null_action_mean(pos, 1, rng, draws=512) - world.true_mean(moved)) ** 2).mean())
        floors.append(float(np.mean(err)))
    assert floors[1] > 1.5 * floors[0]
    with pytest.raises(ValueError, match="action_range"):
        ToyWorld.make(0, 0.0)


def test_the_store_holds_the_world_and_actions_move_the_agent(tmp_path):
    store = write_toy_world(tmp_path / "toy.zarr", episodes=8, length=10, action_range=1.5)
    reader = TokenReader(store)
    eps = reader.episodes
    assert len(eps) == 8 and set(eps.split) == {"train", "val"}
    w = reader.read(Window(0, 0, 10), ("patch", "state", "action"))
    assert 0.6 < np.abs(w["action"]).max() <= 1.5  # the store's actions are of the range asked for
    world = ToyWorld.make(0, 1.5)
    for t in range(9):
        np.testing.assert_allclose(w["state"][t + 1], step(w["state"][t], w["action"][t]), atol=1e-6)
    # a frame is the world's mean frame at the agent's position up to the distractor and the noise
    dev = np.abs(w["patch"][:, 0].astype(np.float64) - np.stack([world.true_mean(p) for p in w["state"]]))
    assert dev.max() < np.sqrt(world.true_variance()).max() + 0.3
    # the store knows its world (what `measure` scores against), and refuses episodes of another
    recorded = world_of(store)
    assert recorded.action_range == 1.5 and np.array_equal(recorded.true_mean(np.ones(2)), world.true_mean(np.ones(2)))
    with pytest.raises(ConfigMismatchError, match="action_range"):
        write_toy_world(store, episodes=8, length=10, action_range=ACTION_RANGE, source="more")


@pytest.mark.slow
def test_the_study_harness_on_a_briefly_trained_model(tmp_path):
    """measure() against the exact answer on a model trained for 120 steps: the oracle's error is the true
    variance, its samples beat the model's on the energy score, the floor without the actions is above the one
    with them, and neither floor is beaten. (Whether a model uses its actions takes longer training: the study,
    `scripts/shortcut_study.py`, reports it; at 120 or 300 steps the with-action and null-action errors are
    still equal.)"""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("shortcut_study",
                                                  Path(__file__).parents[1] / "scripts" / "shortcut_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    store = write_toy_world(tmp_path / "toy.zarr", episodes=24)
    cfg = study.variant_config("action_add", store, tmp_path, steps=120, seed=0)
    from trainer.api import LoadedWorldModel
    from trainer.loop import run_train

    wm = LoadedWorldModel.load(run_train(dataclasses.replace(cfg, batch_size=16)).run_dir)
    m = measure(wm, store, horizons=(1,), samples=4, ks=(1, 4))
    row = m["horizons"][1]
    assert row["oracle_mse"] == pytest.approx(m["true_variance"], rel=0.2)
    assert row["oracle_energy"] < row["k"][4]["energy"]  # nothing beats the truth on a proper score
    assert row["k"][4]["mse_mean_inf"] <= row["k"][4]["mse"]  # the mean of 4 carries a quarter of the variance
    # the floors: without the actions the truth is further, and no model gets below a floor beyond noise
    assert row["oracle_mse"] < 0.8 * row["oracle_null_mse"]
    assert row["null_mse"] > 0.9 * row["oracle_null_mse"]
    assert row["k"][1]["mse"] >= row["oracle_mse"] * 0.9


def _script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_action_use_by_level_scores_the_actions_against_the_null_action_on_the_same_noise(tmp_path):
    """`scripts/action_use_by_level.py` on a model trained for 2 steps: one row per signal level, gain = null minus
    with-action error, and the gain comes from the actions alone: with the action pathway zeroed (the action token is
    then the null action's) it is exactly 0 at every level, with it not."""
    import torch

    from trainer.api import LoadedWorldModel
    from trainer.loop import run_train

    study, levels = _script("shortcut_study"), _script("action_use_by_level")
    store = write_toy_world(tmp_path / "toy.zarr", episodes=16, length=12)
    cfg = study.variant_config("action_add", store, tmp_path, steps=2, seed=0)
    wm = LoadedWorldModel.load(run_train(dataclasses.replace(cfg, batch_size=4, context_frames=4)).run_dir)
    kw = dict(levels=[0.0, 0.5], k=4, episodes=2, per_episode=2, draws=1, seed=0)
    res = levels.level_errors(wm, store, **kw)
    assert [r["tau"] for r in res["levels"]] == [0.0, 0.5] and res["kind"] == "shortcut"
    for r in res["levels"]:
        assert r["patch_gain"] == pytest.approx(r["patch_null"] - r["patch_act"])
        assert "state_act" not in r  # the toy world's model has no state token
    assert any(abs(r["patch_gain"]) > 1e-6 for r in res["levels"])
    with torch.no_grad():
        last = wm.model.action_mlp[-1]
        last.weight.zero_()
        last.bias.zero_()
    assert all(r["patch_gain"] == 0.0 for r in levels.level_errors(wm, store, **kw)["levels"])


# ------------------------------------------------------------------ the gate: action-dependent two-way outcomes
def _gated(**kw):
    from trainer.toyworld import Gate

    return ToyWorld.make(0, 1.5, Gate(**kw))


def test_a_move_into_the_gate_has_two_outcomes_whose_mixture_is_the_exact_next_frame():
    world, rng = _gated(), np.random.default_rng(2)
    g = world.gate
    pos = np.array([0.2, 0.4])
    into = np.asarray(g.center) - pos  # aimed at the gate's centre
    (p1, through), (p2, pit) = world.outcomes(pos, into)
    assert (p1, p2) == (g.through, 1 - g.through)
    np.testing.assert_allclose(through, g.center)
    np.testing.assert_allclose(pit, g.trap)
    draws = world.next_samples(pos, into, 4000, rng)
    np.testing.assert_allclose(draws.mean(0), world.next_mean(pos, into), atol=0.05)
    np.testing.assert_allclose(draws.var(0), world.next_variance(pos, into), rtol=0.1, atol=3e-3)
    # the mixture's mean is half an agent at each place, its variance above the within-position one
    np.testing.assert_allclose(world.next_mean(pos, into), (world.true_mean(through) + world.true_mean(pit)) / 2)
    assert world.next_variance(pos, into).max() > 2 * world.true_variance().max()
    # a move that stays out of the gate is the position's own distribution
    out = np.array([0.3, 0.0])
    ((prob, q),) = world.outcomes(pos, out)
    assert prob == 1.0 and np.array_equal(q, step(pos, out))
    np.testing.assert_allclose(world.next_mean(pos, out), world.true_mean(step(pos, out)))
    np.testing.assert_allclose(world.next_variance(pos, out), world.true_variance())


def test_two_moves_branch_twice_and_the_sampled_moves_follow_the_branches():
    world, rng = _gated(through=0.3), np.random.default_rng(3)
    g = world.gate
    pos = np.array([0.3, 0.3])
    moves = np.stack([np.asarray(g.center) - pos, np.zeros(2)])  # into the gate, then stay (in it, or in the pit)
    branches = world.outcomes(pos, moves)
    assert sum(p for p, _ in branches) == pytest.approx(1.0)
    at_centre = sum(p for p, q in branches if np.allclose(q, g.center))
    assert at_centre == pytest.approx(g.through ** 2)  # staying inside the gate is a second coin
    n = 20000
    ends = np.repeat(pos[None], n, axis=0)
    for a in moves:
        ends = world.move(ends, np.broadcast_to(a, ends.shape), world.coin(rng, n))
    freq = np.all(np.isclose(ends, g.center), axis=1).mean()
    assert abs(freq - at_centre) < 4 * np.sqrt(at_centre * (1 - at_centre) / n)
    assert np.all(np.isclose(ends, g.center).all(1) | np.isclose(ends, g.trap).all(1))
    draws = world.next_samples(pos, moves, 3000, rng)
    np.testing.assert_allclose(draws.mean(0), world.next_mean(pos, moves), atol=0.06)
    np.testing.assert_allclose(draws.var(0), world.next_variance(pos, moves), rtol=0.12, atol=3e-3)


def test_a_gated_store_moves_by_the_gate_and_records_it(tmp_path):
    from trainer.toyworld import Gate, measure

    gate = Gate(through=0.5)
    store = write_toy_world(tmp_path / "gated.zarr", episodes=16, length=24, action_range=1.5, gate=gate)
    reader = TokenReader(store)
    eps = [reader.read(Window(e, 0, 24), ("state", "action")) for e in range(16)]
    aimed = np.concatenate([step(w["state"][:-1].astype(np.float64), w["action"][:-1]) for w in eps])
    landed = np.concatenate([w["state"][1:].astype(np.float64) for w in eps])
    fell = ~np.isclose(landed, aimed, atol=1e-5).all(1)
    entered = gate.holds(aimed)
    assert not (fell & ~entered).any()  # only moves into the gate fall
    assert np.isclose(landed[fell], gate.trap).all()
    n = entered.sum()
    assert n > 30 and abs(fell.sum() / n - (1 - gate.through)) < 4 * np.sqrt(0.25 / n)
    assert world_of(store).gate == gate
    with pytest.raises(ConfigMismatchError):  # the gated world's identity is another world's
        write_toy_world(store, episodes=8, length=10, action_range=1.5, source="more")
    from pipeline.stage import UserError
    with pytest.raises(UserError, match="gate"):
        measure(None, store)


def test_without_the_gate_the_world_and_its_store_are_those_of_before(tmp_path):
    """The store the default world writes, rebuilt here with the generator as it was before the gate existed:
    the same tokens, actions and states bit for bit, and the same identity."""
    from trainer.toyworld import IDENTITY, Gate

    episodes, length = 4, 10
    store = write_toy_world(tmp_path / "toy.zarr", episodes=episodes, length=length, seed=5)
    world, rng = ToyWorld.make(0), np.random.default_rng(5)
    patch, action, state = [], [], []
    for _ in range(episodes):
        pos = rng.uniform(0, 3, 2)
        for _ in range(length):
            a = world.action(rng)
            patch.append(world.frame(pos, int(rng.integers(2)), rng))
            state.append(pos.copy())
            action.append(a)
            pos = step(pos, a)
    reader = TokenReader(store)
    eps = [reader.read(Window(e, 0, length), ("patch", "state", "action")) for e in range(episodes)]
    got = {k: np.concatenate([w[k] for w in eps]) for k in eps[0]}
    stored = np.stack(patch).astype(np.float16).astype(got["patch"].dtype)  # the store keeps float16 tokens
    np.testing.assert_array_equal(got["patch"][:, 0], stored)
    np.testing.assert_array_equal(got["action"], np.stack(action).astype(got["action"].dtype))
    np.testing.assert_array_equal(got["state"], np.stack(state).astype(got["state"].dtype))
    assert reader.encoder["world"] == {"seed": 0, "action_range": ACTION_RANGE}
    assert {k: v for k, v in reader.encoder.items() if k != "world"} == {k: v for k, v in IDENTITY.items()}
    gated = ToyWorld.make(0, ACTION_RANGE, Gate())
    for name in ("background", "agent", "distractor"):  # the gate changes the dynamics, not the world's looks
        np.testing.assert_array_equal(getattr(gated, name), getattr(world, name))
    assert world.coin(rng) is None and np.array_equal(world.move(np.ones(2), np.full(2, 0.5), None), step(
        np.ones(2), np.full(2, 0.5)))
    many = rng.uniform(0, 3, (5, 2))  # frames of many positions at once: each the frame of its position
    np.testing.assert_array_equal(world.frame(many, 1, None), np.stack([world.frame(p, 1, None) for p in many]))


def test_planning_on_the_expected_cost_of_true_samples_beats_planning_on_the_true_mean():
    """The task's design, without training: the exact answer as a model. Scoring a move by the mean cost over true
    samples stops at the gate's edge; scoring the true conditional mean (what a perfect MSE model predicts) jumps
    into the gate and falls into the pit half of the time. The margin the study asks of a trained model (15 points,
    p < 0.05) must hold for the oracle."""
    from planner.cem import CEMConfig

    study = _script("toy_two_way")
    world = ToyWorld.make(0, study.ACTION_RANGE, study.GATE)
    problems = {"oracle_samples": study.oracle_problem(world, draws=8, score="expected"),
                "oracle_mean": study.oracle_problem(world, draws=8, score="mean")}
    res = study.run_trials(world, problems, study.make_trials(world, 30, seed=1),
                           CEMConfig(horizon=1, samples=32, elites=4, iterations=3))
    samples, mean = res["arms"]["oracle_samples"], res["arms"]["oracle_mean"]
    pair = res["pairs"]["oracle_samples_vs_oracle_mean"]
    assert samples["success_rate"] >= mean["success_rate"] + 0.15 and pair["mcnemar_p"] < 0.05
    assert mean["aimed_into_gate"] > 0.9 > samples["aimed_into_gate"]  # the mean planner jumps, the other mostly not
    for rows in res["per_trial"].values():  # a trial fails only by the pit, and only after a move into the gate
        assert all(r["success"] or (r["fell"] and r["aimed_into_gate"]) for r in rows)


def test_the_two_way_study_plans_with_trained_models_end_to_end(tmp_path):
    """`scripts/toy_two_way.py`'s pieces on models trained for 2 steps: every arm plans every trial, the summary
    and the paired comparison are rates and probabilities, and the gate report reads the models' predictions."""
    from planner.cem import CEMConfig

    study = _script("toy_two_way")
    world = ToyWorld.make(0, study.ACTION_RANGE, study.GATE)
    store = write_toy_world(tmp_path / "toy.zarr", episodes=8, length=12, action_range=study.ACTION_RANGE,
                            gate=study.GATE)
    models = {arm: study.train(v, store, tmp_path, steps=2, seed=0, reuse=False, batch_size=4)[0]
              for arm, v in study.VARIANTS.items()}
    assert models["shortcut"].sampler and not models["control"].sampler
    trials = study.make_trials(world, 2, seed=0)
    problems = {"shortcut": study.model_problem(models["shortcut"], world, k=2, draws=2),
                "control": study.model_problem(models["control"], world, k=2, draws=1),
                "shortcut_mean": study.model_problem(models["shortcut"], world, k=2, draws=2, score="mean")}
    res = study.run_trials(world, problems, trials, CEMConfig(horizon=1, samples=8, elites=2, iterations=1))
    assert res["trials"] == 2 and set(res["arms"]) == set(problems)
    assert set(res["pairs"]) == {"shortcut_vs_control", "shortcut_vs_shortcut_mean"}
    for arm, summary in res["arms"].items():
        assert len(res["per_trial"][arm]) == 2
        assert all(0 <= summary[key] <= 1 for key in ("success_rate", "aimed_into_gate", "fell"))
        for row in res["per_trial"][arm]:
            assert np.abs(row["action"]).max() <= study.ACTION_RANGE + 1e-6
            assert row["success"] == (row["distance"] <= study.SUCCESS_RADIUS)
    for pair in res["pairs"].values():
        assert 0 <= pair["mcnemar_p"] <= 1 and pair["only_a"] + pair["only_b"] <= 2
    gate = {arm: study.gate_predictions(wm, world, trials, k=2, draws=3) for arm, wm in models.items()}
    assert gate["shortcut"]["predictions"] == 6 and gate["control"]["predictions"] == 2  # one per context
    assert all(0 <= g["mostly_in_pit"] <= 1 and np.isfinite(g["at_goal_mean"]) for g in gate.values())


def test_a_stopped_two_way_study_goes_on_from_its_trials_and_gives_what_one_run_gives():
    from planner.cem import CEMConfig

    study = _script("toy_two_way")
    world = ToyWorld.make(0, study.ACTION_RANGE, study.GATE)
    problems = {"oracle_samples": study.oracle_problem(world, draws=2, score="expected"),
                "oracle_mean": study.oracle_problem(world, draws=2, score="mean")}
    trials, cem = study.make_trials(world, 4, seed=2), CEMConfig(horizon=1, samples=8, elites=2, iterations=2)
    seen = []
    whole = study.run_trials(world, problems, trials, cem, progress=lambda rows: seen.append(len(rows["oracle_mean"])))
    assert seen == [1, 2, 3, 4]
    first = {name: rows[:2] for name, rows in whole["per_trial"].items()}
    first["oracle_mean"] = whole["per_trial"]["oracle_mean"][:3]  # an arm ahead of the others: its extra trial again
    resumed = study.run_trials(world, problems, trials, cem, done=first)
    strip = lambda res: {n: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
                         for n, rows in res["per_trial"].items()}
    assert strip(resumed) == strip(whole) and resumed["pairs"] == whole["pairs"]
