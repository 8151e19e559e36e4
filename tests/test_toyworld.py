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
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
